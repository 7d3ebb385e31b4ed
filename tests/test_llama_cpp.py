"""llama.cpp itself runs `slicegpt` GGUF files (integrations/llama.cpp, built by scripts/build_llama_cpp.sh).

Skipped when the bindings are not built, unless SLICEGPT_REQUIRE_LLAMA_CPP=1 (set by .ci/run, which builds them).
"""

from __future__ import annotations

import struct

import gguf
import pytest
import torch
from tiny import BUDGET_CASES, VOCAB, write_sliced_checkpoint

from slicegpt_export import gguf_spec as spec
from slicegpt_export.checkpoint import load_sliced
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.gguf import export_gguf
from slicegpt_export.modeling import generate
from slicegpt_export.validation.gguf_runner import GGUFFormatError, GGUFModel
from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel

pytestmark = pytest.mark.usefixtures("llama_cpp")

LOGIT_BOUND = 1e-3  # f32 file and f32 KV cache against the PyTorch reference (measured ~3e-6)
# mistral and phi3: a sliding window of 12 positions, shorter than the 32 these tests reach; phi3's LongRoPE uses
# its short factors in every runtime here (n_ctx 64, which llama.cpp rounds up to 256, is not beyond its 256 original positions)
# gemma2 and gemma3_text: a sliding layer (window 12) then a global one
FAMILIES = ("llama", "llama-tied", "llama-rope-llama3", "mistral", "qwen2", "qwen3", "smollm3", "opt", "phi", "phi3", "gemma2",
            "gemma3_text")
CASES = [(family, sparsity) for family in FAMILIES for sparsity in (0.0, 0.25)] + BUDGET_CASES


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}" for f, s in CASES])
def exported(request, tmp_path_factory):
    family, sparsity = request.param
    root = tmp_path_factory.mktemp(f"{family}-{sparsity}")
    checkpoint = write_sliced_checkpoint(family, sparsity, root / "checkpoint")
    return checkpoint, export_gguf(checkpoint=checkpoint, out=root / "f32", gguf_type="f32")


def prompt(length: int = 16, seed: int = 3) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_llama_cpp_logits_match_the_reference(exported):
    checkpoint, path = exported
    ids = prompt()
    got = LlamaCppModel(path, n_ctx=64).logits(torch.tensor([ids]))
    want = load_sliced(checkpoint)(torch.tensor([ids])).logits
    assert (got - want).abs().max().item() <= LOGIT_BOUND


def test_llama_cpp_greedy_continuation_is_the_references(exported):
    checkpoint, path = exported
    ids = prompt(seed=5)
    want = generate(load_sliced(checkpoint), torch.tensor([ids]), max_new_tokens=16)[0, len(ids) :].tolist()
    assert LlamaCppModel(path, n_ctx=64).greedy(ids, 16) == want


@pytest.mark.parametrize(("family", "slicing"), [("llama", 0.25), ("phi", 0.25), ("llama-tied", "budget-tied"), ("qwen2", "budget")])
def test_q8_0_file_picks_the_references_tokens(family, slicing, tmp_path, wikitext):
    # trained, so that top-1 is a real choice: a random model's top two logits are near-ties.  Measured 98.0-99.6%:
    # besides the 8-bit weights, llama.cpp rounds activations to 8 bits in q8_0 products (our runner: 98.8-100%)
    # the default q8_0 file: all q8_0, the residual path in the aligned basis with its shortcuts stored as S - J
    checkpoint = write_sliced_checkpoint(family, slicing, tmp_path / "checkpoint", train_on=wikitext / "valid.txt")
    path = export_gguf(checkpoint=checkpoint, out=tmp_path / "q8", gguf_type="q8_0")
    ids = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(3))
    got = LlamaCppModel(path, n_ctx=64).logits(ids)
    agree = (got.argmax(-1) == load_sliced(checkpoint)(ids).logits.argmax(-1)).float().mean().item()
    assert agree >= 0.97, agree


ALIGNED_CASES = [("llama", 0.25), ("phi", 0.25), ("gemma2", 0.25), *BUDGET_CASES]


@pytest.mark.parametrize(("family", "slicing"), ALIGNED_CASES)
def test_shortcuts_stored_as_corrections_run_exactly(family, slicing, tmp_path):
    # the aligned basis in an f32 file: shortcuts stored as S - J (spec version 4), llama.cpp adds J x back (a view of
    # x's first rows, or x zero-extended where a per-layer width grows)
    checkpoint = write_sliced_checkpoint(family, slicing, tmp_path / "checkpoint")
    path = export_gguf(checkpoint=checkpoint, out=tmp_path / "f32", gguf_type="f32", basis="aligned")
    assert gguf.GGUFReader(path).fields[spec.SHORTCUT_DELTA].contents() is True
    ids = prompt()
    want = load_sliced(checkpoint)(torch.tensor([ids])).logits
    assert (LlamaCppModel(path, n_ctx=64).logits(torch.tensor([ids])) - want).abs().max().item() <= LOGIT_BOUND


def rewrite_key(path, out, key: str, value: int) -> None:
    """Copy a GGUF file with one uint32 key changed in place (same size, so offsets stay valid)."""
    data = bytearray(path.read_bytes())
    field = gguf.GGUFReader(path).fields[key]
    offset = int(field.offset) + sum(p.nbytes for p in field.parts[:-1])
    struct.pack_into("<I", data, offset, value)
    out.write_bytes(bytes(data))


def test_unsupported_or_broken_files_are_refused_not_crashed(tmp_path):
    checkpoint = write_sliced_checkpoint("llama", 0.25, tmp_path / "checkpoint")
    path = export_gguf(checkpoint=checkpoint, out=tmp_path / "f32", gguf_type="f32")
    future = tmp_path / "future.gguf"
    rewrite_key(path, future, spec.SPEC_VERSION_KEY, max(spec.READABLE_SPEC_VERSIONS) + 1)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    corrections = export_gguf(checkpoint=checkpoint, out=tmp_path / "aligned", gguf_type="f32", basis="aligned")
    mislabelled = tmp_path / "corrections-as-version-3.gguf"  # S - J where a version 3 reader would read S
    rewrite_key(corrections, mislabelled, spec.SPEC_VERSION_KEY, 3)
    for bad in (future, truncated, mislabelled):
        with pytest.raises(SliceGPTError, match="llama.cpp could not load"):
            LlamaCppModel(bad, n_ctx=64)
    with pytest.raises(GGUFFormatError, match="needs spec version 4"):
        GGUFModel(mislabelled)


def test_file_only_runner_reads_llama3_rope_scaling(tmp_path):
    checkpoint = write_sliced_checkpoint("llama-rope-llama3", 0.25, tmp_path / "checkpoint")
    path = export_gguf(checkpoint=checkpoint, out=tmp_path / "f32", gguf_type="f32")
    ids = torch.tensor([prompt(48)])  # past the 16 original positions, where the scaling matters
    assert (GGUFModel(path).logits(ids) - load_sliced(checkpoint)(ids).logits).abs().max().item() <= 1e-4


def test_longrope_long_factors_beyond_the_original_context(tmp_path):
    # llama.cpp picks LongRoPE's long factors by context size (n_ctx 512 > the 256 original positions), the
    # reference by the largest position of the call: the two agree on a 300-token prompt
    checkpoint = write_sliced_checkpoint("phi3", 0.25, tmp_path / "checkpoint")
    path = export_gguf(checkpoint=checkpoint, out=tmp_path / "f32", gguf_type="f32")
    ids = torch.tensor([prompt(300)])
    want = load_sliced(checkpoint)(ids).logits
    assert (LlamaCppModel(path, n_ctx=512).logits(ids) - want).abs().max().item() <= LOGIT_BOUND
