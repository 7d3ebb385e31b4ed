import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from slicegpt_export.errors import SliceGPTError
from slicegpt_export.sources.text import read_local_text, sample_windows


def test_windows_follow_the_protocol_draw():
    ids = torch.arange(10_000)
    windows = sample_windows(ids, samples=64, seqlen=512, seed=42)
    torch.manual_seed(42)
    starts = torch.randint(0, 10_000 - 512 + 1, (64,))
    assert torch.equal(windows, torch.stack([ids[s : s + 512] for s in starts]))


def test_too_little_text_is_refused():
    with pytest.raises(SliceGPTError, match="too little calibration text: 100 tokens"):
        sample_windows(torch.arange(100), samples=4, seqlen=128, seed=0)


def test_text_jsonl_parquet_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    pq.write_table(pa.table({"text": ["delta", "eps"]}), tmp_path / "c.parquet")
    assert read_local_text(tmp_path / "b.jsonl") == "beta\n\ngamma"
    assert read_local_text(tmp_path / "c.parquet") == "delta\n\neps"
    assert read_local_text(tmp_path) == "alpha\n\nbeta\n\ngamma\n\ndelta\n\neps"


def test_jsonl_without_text_field_is_refused(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SliceGPTError, match="cannot read calibration file"):
        read_local_text(tmp_path / "bad.jsonl")


def test_bos_windows_start_with_bos_and_draw_like_the_protocol():
    # a model trained to always see BOS (Gemma) gets it at the start of every window: BOS, then T - 1 text tokens
    from slicegpt_export.sources.text import evaluation_windows, sample_windows

    ids = torch.arange(1000, 1100)
    drawn = sample_windows(ids, samples=4, seqlen=8, seed=42, bos=7)
    torch.manual_seed(42)
    starts = torch.randint(0, 100 - 7 + 1, (4,))
    assert drawn.tolist() == [[7] + ids[s : s + 7].tolist() for s in starts.tolist()]
    consecutive = evaluation_windows(ids, seqlen=8, windows=3, bos=7)
    assert consecutive.tolist() == [[7] + ids[i * 7 : i * 7 + 7].tolist() for i in range(3)]
    assert torch.equal(sample_windows(ids, samples=4, seqlen=8, seed=42), sample_windows(ids, samples=4, seqlen=8, seed=42, bos=None))


def test_gemma_checkpoint_calibrates_and_evaluates_with_bos(tmp_path, wikitext):
    from tiny import save_tiny_model

    from slicegpt_export.checkpoint import read_config
    from slicegpt_export.converter.convert import slice_checkpoint
    from slicegpt_export.validation.report import evaluation_ids

    source = save_tiny_model("gemma2", tmp_path / "gemma2")
    out = slice_checkpoint(model=str(source), out=tmp_path / "sliced", calib=str(wikitext / "valid.txt"), calib_samples=4,
                           calib_seqlen=32, sparsity=0.25, device="cpu", progress=False).out  # fmt: skip
    cfg, _ = read_config(out)
    assert cfg.bos_windows and cfg.calibration["bos_windows"]
    windows = evaluation_ids(out, wikitext / "test.txt", seqlen=32, windows=4)
    assert windows.shape == (4, 32) and (windows[:, 0] == 255).all() and not (windows[:, 1:] == 255).all()
