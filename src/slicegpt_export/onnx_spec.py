"""The ONNX decoder's interface: file names and input/output names, shared by the exporter and its runner.

Names follow Optimum and onnxruntime-genai: inputs ``input_ids`` (B, T), ``attention_mask``
(B, P + T), ``position_ids`` (B, T), ``past_key_values.N.key`` / ``.value`` (B, K, P, hd);
outputs ``logits`` (B, T, vocab), ``present.N.key`` / ``.value`` (B, K, P + T, hd).
"""

from __future__ import annotations

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"


def past_name(i: int, kind: str) -> str:
    return f"past_key_values.{i}.{kind}"


def present_name(i: int, kind: str) -> str:
    return f"present.{i}.{kind}"
