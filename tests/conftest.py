import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not (WIKITEXT / "valid.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT}")
    return WIKITEXT


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python built with integrations/llama.cpp; skips without it unless SLICEGPT_REQUIRE_LLAMA_CPP=1."""
    from slicegpt_export.errors import SliceGPTError
    from slicegpt_export.validation.llama_cpp_runner import import_llama_cpp

    try:
        return import_llama_cpp()
    except SliceGPTError as exc:
        if os.environ.get("SLICEGPT_REQUIRE_LLAMA_CPP") == "1":
            raise
        pytest.skip(str(exc))


@pytest.fixture(autouse=True)
def generation_cache(tmp_path_factory, monkeypatch):
    """Text the models generate is cached in a folder of the test session, never in the user's cache."""
    from slicegpt_export.sources.generation import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "generation-cache"))
