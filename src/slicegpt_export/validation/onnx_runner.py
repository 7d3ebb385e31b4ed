"""Run an exported ONNX decoder in ONNX Runtime and check it against the PyTorch reference."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from slicegpt_export.checkpoint import load_sliced, read_config
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import SlicedModel
from slicegpt_export.onnx_spec import MODEL_FILE, past_name, present_name

logger = logging.getLogger(__name__)

#: max |logit difference| allowed per precision on random prompts (real models: 30 fp32 layers reach ~1e-4 on
#: logits of ~20).  fp16 and quantized graphs are reported, not bounded: they are judged by perplexity on text.
TOLERANCES = {"float32": 1e-3}
PROMPT_LEN, DECODE_STEPS = 12, 4  # the export check: 2 random-token prompts of PROMPT_LEN, then DECODE_STEPS greedy steps


class OnnxValidationError(SliceGPTError):
    """One or more ONNX outputs differ from the reference beyond the tolerance."""


def providers() -> list[str]:
    """CUDA first when this onnxruntime build and machine have it, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxDecoder:
    """A session over model.onnx with the Optimum/genai input names; keeps its own KV cache."""

    def __init__(self, directory: Path, *, provider_list: list[str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(directory) / MODEL_FILE
        if not path.is_file():
            raise SliceGPTError(f"{directory} has no {MODEL_FILE}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=provider_list or providers())
        self.num_layers = sum(1 for i in self.session.get_inputs() if i.name.endswith(".key"))
        kv = next(i for i in self.session.get_inputs() if i.name == past_name(0, "key"))
        self.kv_heads, self.head_dim = kv.shape[1], kv.shape[3]
        self.dtype = np.float16 if "float16" in kv.type else np.float32

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {past_name(i, k): np.zeros(shape, self.dtype) for i in range(self.num_layers) for k in ("key", "value")}

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits (B, T, V) as float32 and the next past, for T new tokens after `past`."""
        T = input_ids.shape[1]
        positions = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)[:, -T:]
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64), **past}  # fmt: skip
        names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(names, feeds)))
        present = {past_name(i, k): outputs[present_name(i, k)] for i in range(self.num_layers) for k in ("key", "value")}
        return outputs["logits"].astype(np.float32), present

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of full windows (no past), for perplexity."""
        ids = input_ids.numpy()
        out, _ = self.run(ids, np.ones_like(ids), self.empty_past(ids.shape[0]))
        return torch.from_numpy(out)


@dataclasses.dataclass
class StepComparison:
    step: str  # "prefill" or "decode N"
    max_abs_diff: float
    top1_agreement: float


def compare_with_reference(
    decoder: OnnxDecoder, reference: SlicedModel, *, prompt_len: int = PROMPT_LEN, decode_steps: int = DECODE_STEPS, seed: int = 0,
    left_pad: int = 3,
) -> list[StepComparison]:
    """Prefill a batch of 2 (row 1 left-padded by `left_pad`) then `decode_steps` greedy steps; compare real positions."""
    vocab = reference.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, prompt_len), generator=gen)
    mask = torch.ones(2, prompt_len, dtype=torch.long)
    mask[1, :left_pad] = 0
    ref = reference(ids, attention_mask=mask, use_cache=True)
    got, past = decoder.run(ids.numpy(), mask.numpy(), decoder.empty_past(2))
    results = [summarize("prefill", ref.logits, torch.from_numpy(got), mask)]
    for step in range(decode_steps):
        nxt = ref.logits[:, -1].argmax(-1, keepdim=True)  # (2, 1): both sides continue with the reference's choice
        mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
        ref = reference(nxt, attention_mask=mask, past_key_values=ref.past_key_values)
        got, past = decoder.run(nxt.numpy(), mask.numpy(), past)
        results.append(summarize(f"decode {step + 1}", ref.logits, torch.from_numpy(got), mask[:, -1:]))
    return results


def summarize(step: str, expected: torch.Tensor, got: torch.Tensor, mask: torch.Tensor) -> StepComparison:
    real = mask[:, -expected.shape[1] :].bool()  # (B, T) positions that are real tokens
    e, g = expected.float()[real], got.float()[real]  # (N, V)
    return StepComparison(step, (e - g).abs().max().item(), (e.argmax(-1) == g.argmax(-1)).float().mean().item())


def validate_onnx(onnx_dir: Path, checkpoint: Path, *, tolerance: float | None = None) -> list[StepComparison]:
    """Compare an exported graph with the reference; log every step, then raise one error listing all mismatches."""
    decoder = OnnxDecoder(onnx_dir)
    cfg, _ = read_config(checkpoint)
    reference = load_sliced(checkpoint)
    precision = "float16" if decoder.dtype == np.float16 else "float32"
    quantized = any(n.op_type == "MatMulNBits" for n in _graph_nodes(onnx_dir))
    bound = tolerance if tolerance is not None else (None if quantized else TOLERANCES.get(precision))
    grouped = any(n.op_type == "GroupQueryAttention" for n in _graph_nodes(onnx_dir))  # the CUDA target: right padding only
    with torch.no_grad():
        results = compare_with_reference(decoder, reference, left_pad=0 if grouped else 3)
    logger.info("onnx against the reference on 2 prompts of %d random tokens (one left-padded), then %d greedy steps "
                "(random tokens are harder on lossy types than text; the validate table compares on text):", PROMPT_LEN, DECODE_STEPS)
    for r in results:
        logger.info("  onnx %-9s max |logit diff| %.3g, top-1 agreement %.1f%%", r.step, r.max_abs_diff, 100 * r.top1_agreement)
    if bound is not None:
        bad = [r for r in results if not r.max_abs_diff <= bound]
        if bad:
            detail = "; ".join(f"{r.step}: {r.max_abs_diff:.3g}" for r in bad)
            raise OnnxValidationError(f"ONNX logits differ from the reference beyond {bound:g} ({cfg.model_type}): {detail}")
    return results


def _graph_nodes(onnx_dir: Path):
    import onnx

    return onnx.load(str(Path(onnx_dir) / MODEL_FILE), load_external_data=False).graph.node
