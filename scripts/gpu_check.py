"""Everything with a GPU path, run on a CUDA machine; prints one table (and writes it as JSON with --json).

    bash scripts/gpu_check.sh [--model PATH] [--data DIR] [--json OUT]

Rows:
* slicing SmolLM2-135M-Instruct at 0.25 with --device cuda (the protocol's calibration, 64 x 512): time, and
  WikiText-2 test perplexity (64 x 512) of the checkpoint on CUDA, in memory and layer-streamed;
* the ONNX fp16 graph for CUDA (GroupQueryAttention, --execution-provider cuda) on ONNX Runtime's CUDA provider:
  perplexity and the largest logit difference from the reference (2 prompts, 4 greedy steps);
* onnxruntime-genai on CUDA, when its CUDA wheel is installed;
* recovery fine-tuning (150 steps of distillation, the CLI's default) on CUDA, run twice with the same seed: training
  time, WikiText-2 test perplexity of the result, and the largest difference between the two runs' weights.
A row whose requirement is missing says so instead of a number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def test_windows(checkpoint: Path, data: Path) -> torch.Tensor:
    from slicegpt_export.sources.text import text_windows
    from slicegpt_export.sources.tokenizer import load_tokenizer

    return text_windows(data / "test.txt", load_tokenizer(checkpoint), seqlen=512, windows=64)


def slice_on_cuda(model: str | None, data: Path, out: Path) -> dict[str, Any]:
    from slicegpt_export.converter.convert import slice_checkpoint

    torch.cuda.synchronize()
    start = time.perf_counter()
    summary = slice_checkpoint(model=model, out=out, sparsity=0.25, calib=str(data / "valid.txt"), calib_samples=64, calib_seqlen=512,
                               seed=42, device="cuda", progress=False)  # fmt: skip
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "parameter_fraction": summary.config.size["parameter_fraction"]}


def reference_perplexity(checkpoint: Path, windows: torch.Tensor, *, stream: bool) -> float:
    from slicegpt_export.validation.streamed import open_reference

    return open_reference(checkpoint, device=torch.device("cuda"), stream=stream).perplexity(windows, batch_size=8)


def onnx_cuda(checkpoint: Path, windows: torch.Tensor, out: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from slicegpt_export.exporters.onnx import export_onnx
    from slicegpt_export.validation.onnx_runner import OnnxDecoder, validate_onnx
    from slicegpt_export.validation.perplexity import perplexity

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"}
    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels beside torch
        ort.preload_dlls()
    export_onnx(checkpoint=checkpoint, out=out, precision="fp16", execution_provider="cuda")
    decoder = OnnxDecoder(out, provider_list=["CUDAExecutionProvider"])
    used = decoder.session.get_providers()
    start = time.perf_counter()
    ppl = perplexity(decoder.logits, windows, batch_size=8)
    seconds = time.perf_counter() - start
    results = validate_onnx(out, checkpoint, tolerance=float("inf"))  # the session validate_onnx opens takes CUDA first
    return {"perplexity": ppl, "max_abs_logit_diff": max(r.max_abs_diff for r in results), "top1": min(r.top1_agreement for r in results),
            "providers": used, "eval_seconds": seconds}  # fmt: skip


PROMPT = "The capital of France is"
NEW_TOKENS = 12


def genai_cuda(onnx_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """Greedy tokens from onnxruntime-genai on CUDA, fed the checkpoint's own token ids, against the reference's.

    The ids come from the Hugging Face tokenizer: genai-cuda 0.18's own tokenizer encoded this prompt with -1 ids
    on an H200 machine (2026-11-26), so its agreement is reported separately.
    """
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"skipped": "onnxruntime-genai-cuda is not installed"}
    import numpy as np

    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.modeling import generate
    from slicegpt_export.sources.tokenizer import load_tokenizer

    ids = load_tokenizer(checkpoint).encode(PROMPT, add_special_tokens=False)
    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)]
    reference = load_sliced(checkpoint, device="cuda")
    expected = generate(reference, torch.tensor([ids], device="cuda"), max_new_tokens=NEW_TOKENS)[0].tolist()
    own = [int(t) for t in og.Tokenizer(model).encode(PROMPT)]
    return {"greedy_tokens_match_reference": got == expected, "genai_tokenizer_agrees": own == ids}


RECOVERY_STEPS = 150


def recover_on_cuda(checkpoint: Path, windows: torch.Tensor, work: Path) -> dict[str, Any]:
    """Recovery on CUDA twice with the same seed: its training time, the result's perplexity and whether the runs agree."""
    from slicegpt_export.checkpoint import read_tensors
    from slicegpt_export.converter.recovery import recover_checkpoint

    first, second = work / "recovered", work / "recovered-again"
    result = recover_checkpoint(checkpoint=checkpoint, out=first, steps=RECOVERY_STEPS, device="cuda", progress=False)
    recover_checkpoint(checkpoint=checkpoint, out=second, steps=RECOVERY_STEPS, device="cuda", progress=False)
    a, b = read_tensors(first), read_tensors(second)
    return {"training_seconds": result.seconds, "perplexity": reference_perplexity(first, windows, stream=False),
            "max_abs_diff_between_runs": max((a[n].float() - b[n].float()).abs().max().item() for n in a)}  # fmt: skip


def row(name: str, fn) -> dict[str, Any]:
    try:
        return {"check": name, **fn()}
    except Exception as exc:  # noqa: BLE001 -- a failing row is reported, the others still run
        traceback.print_exc()
        return {"check": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="source model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with WikiText-2 valid.txt and test.txt")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device: gpu_check needs a GPU")
    device = torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ckpt = work / "sliced"
    rows = [row("slice --device cuda (SmolLM2, 0.25, 64 x 512)", lambda: slice_on_cuda(args.model, args.data, ckpt))]
    windows = test_windows(ckpt, args.data) if ckpt.is_dir() else None
    if windows is not None:
        rows.append(row("reference on CUDA (in memory)", lambda: {"perplexity": reference_perplexity(ckpt, windows, stream=False)}))
        rows.append(row("reference on CUDA (layer-streamed)", lambda: {"perplexity": reference_perplexity(ckpt, windows, stream=True)}))
        rows.append(row("ONNX fp16, CUDA graph, CUDA provider", lambda: onnx_cuda(ckpt, windows, work / "onnx")))
        rows.append(row("onnxruntime-genai on CUDA (fp16 graph)", lambda: genai_cuda(work / "onnx", ckpt)))
        rows.append(row(f"recover --device cuda ({RECOVERY_STEPS} steps, twice)", lambda: recover_on_cuda(ckpt, windows, work)))
    print(f"\n# gpu_check on {device} (torch {torch.__version__})\n")
    print("| check | result |\n| --- | --- |")
    for r in rows:
        detail = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "check")
        print(f"| {r['check']} | {detail} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
