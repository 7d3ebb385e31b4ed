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
