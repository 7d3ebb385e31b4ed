"""Host memory against model size: peak RSS and time of `slice` (streamed and --in-memory) and of the exports.

Random Llama models in bfloat16 shards, written shard by shard (never whole in memory), are sliced at
the paper's 0.25 with a few calibration windows (4 x 128 tokens of WikiText-2 valid, as a new user
might try) and exported.  Each step runs as its own process; its peak RSS is that process's.

    python bench/scale.py                      # the depth test: hidden 2048, FFN 5632, vocab 32000, 4 and 12 layers
    python bench/scale.py --preset 7b          # a Llama-2-7B-shaped model (about 13.5 GB on disk)

The depth test's slope is (peak RSS at 12 layers - at 4) / (weights on disk at 12 - at 4), in MiB per
MiB; a converter that holds the model in float32 shows about 2, one that streams about 0.
Results: bench/results/scale[-PRESET].json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, REPO, WORK, write_results

sys.path.insert(0, str(REPO / "tests"))
logger = logging.getLogger("bench.scale")

SHAPES = {
    "depth": {"hidden_size": 2048, "intermediate_size": 5632, "vocab_size": 32000, "num_attention_heads": 16, "layers": [4, 12]},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000, "num_attention_heads": 32, "layers": [32]},
}
MiB = 1 << 20
#: the largest shard of the generated source (bytes): Llama-2-7B's own shards are about 10 GB; smaller ones keep generation light
SOURCE_SHARD_BYTES = 2 * 10**9


def llama_config(shape: dict[str, Any], layers: int) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden_size"],
            "intermediate_size": shape["intermediate_size"], "vocab_size": shape["vocab_size"], "num_hidden_layers": layers,
            "num_attention_heads": shape["num_attention_heads"], "num_key_value_heads": shape["num_attention_heads"],
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip


def layer_tensors(shape: dict[str, Any], i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One random block (std 0.02, norms 1) in bfloat16 under Hugging Face Llama names."""
    D, F = shape["hidden_size"], shape["intermediate_size"]
    p = f"model.layers.{i}."
    shapes = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (D, D), "self_attn.v_proj": (D, D), "self_attn.o_proj": (D, D),
              "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}  # fmt: skip
    out = {p + k + ".weight": (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    out[p + "input_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    out[p + "post_attention_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    return out


def random_llama(folder: Path, shape: dict[str, Any], layers: int) -> Path:
    """A random Llama in bfloat16 safetensors shards with the byte tokenizer, written a block at a time."""
    from tiny import byte_tokenizer

    from slicegpt_export.tensorio import ShardWriter

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp, max_shard_bytes=SOURCE_SHARD_BYTES)
    V, D = shape["vocab_size"], shape["hidden_size"]
    writer.add("model.embed_tokens.weight", (torch.randn(V, D, generator=gen) * 0.02).to(torch.bfloat16))
    for i in range(layers):
        writer.add_all(layer_tensors(shape, i, gen))
    writer.add("model.norm.weight", torch.ones(D, dtype=torch.bfloat16))
    writer.add("lm_head.weight", (torch.randn(V, D, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    (tmp / "config.json").write_text(json.dumps(llama_config(shape, layers), indent=2))
    byte_tokenizer().save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


def weights_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.name != "eigenvalues.safetensors") / MiB


def measured(argv: list[str]) -> dict[str, Any]:
    """Run `argv` in its own process; its wall time and peak RSS (the child's own, read by a fresh parent)."""
    probe = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    last = done.stdout.strip().splitlines()[-1].split()
    if int(last[1]) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(int(last[0]) / 1024, 1)}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "slicegpt_export.cli", *args]


def run_steps(model: Path, work: Path, *, in_memory: bool, exports: bool) -> dict[str, Any]:
    """slice (streamed; optionally also --in-memory), then GGUF f16 and ONNX fp16 exports of the streamed checkpoint."""
    calib = ["--calib", str(DATA / "valid.txt"), "--calib-samples", "4", "--calib-seqlen", "128", "--device", "cpu"]
    sliced = work / "sliced"
    steps = {"slice": measured(cli("slice", "--model", str(model), "--out", str(sliced), "--sparsity", "0.25", *calib, "--overwrite"))}
    steps["slice"]["checkpoint_mib"] = round(weights_mib(sliced), 1)
    if in_memory:
        steps["slice --in-memory"] = measured(cli("slice", "--model", str(model), "--out", str(work / "held"), "--sparsity", "0.25", *calib,
                                                  "--in-memory", "--overwrite"))  # fmt: skip
        shutil.rmtree(work / "held", ignore_errors=True)
    if exports:  # each artifact is measured, then deleted (a 7B-shaped one is ~10 GB)
        steps["export gguf f16"] = measured(cli("export", str(sliced), "--out", str(work / "gguf"), "--format", "gguf", "--gguf-type", "f16",
                                                "--no-validate", "--overwrite"))  # fmt: skip
        steps["export gguf f16"]["artifact_mib"] = round(folder_mib(work / "gguf"), 1)
        shutil.rmtree(work / "gguf")
        steps["export onnx fp16 (cuda graph)"] = measured(cli("export", str(sliced), "--out", str(work / "onnx"), "--format", "onnx",
                                                              "--precision", "fp16", "--execution-provider", "cuda", "--no-validate",
                                                              "--overwrite"))  # fmt: skip
        steps["export onnx fp16 (cuda graph)"]["artifact_mib"] = round(folder_mib(work / "onnx"), 1)
        shutil.rmtree(work / "onnx")
    return steps


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / MiB


def markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    about = (f"Random Llama models (bf16 shards), hidden {shape['hidden_size']}, FFN {shape['intermediate_size']}, "
             f"vocabulary {shape['vocab_size']}; `slice --sparsity 0.25` on 4 x 128 calibration tokens, CPU.")  # fmt: skip
    lines = [f"# Host memory against model size ({result['preset']})", "", result["command"], "", about, "",
             "| layers | weights on disk (MiB) | step | time (s) | peak RSS (MiB) |", "| ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    for run in result["runs"]:
        for step, m in run["steps"].items():
            lines.append(f"| {run['layers']} | {run['disk_mib']:,.0f} | {step} | {m['seconds']:,.1f} | {m['peak_rss_mib']:,.0f} |")
    for step, slope in result.get("slopes", {}).items():
        lines.append(f"\nSlope of `{step}`: **{slope:.3f}** MiB of peak RSS per MiB of weights on disk (target: at most 0.25).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(SHAPES), default="depth")
    parser.add_argument("--no-in-memory", action="store_true", help="skip the --in-memory comparison")
    parser.add_argument("--no-exports", action="store_true", help="skip the GGUF and ONNX exports")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape = SHAPES[args.preset]
    runs = []
    for layers in shape["layers"]:
        model = random_llama(WORK / f"random-llama-{shape['hidden_size']}-{layers}", shape, layers)
        logger.info("%d layers: %.0f MiB on disk", layers, weights_mib(model))
        steps = run_steps(model, WORK / f"scale-{args.preset}-{layers}", in_memory=not args.no_in_memory and args.preset == "depth",
                          exports=not args.no_exports)  # fmt: skip
        runs.append({"layers": layers, "disk_mib": round(weights_mib(model), 1), "steps": steps})
        logger.info("%s", json.dumps(runs[-1]))
    result: dict[str, Any] = {"preset": args.preset, "shape": shape, "runs": runs, "command": f"`python bench/scale.py --preset {args.preset}`"}
    if len(runs) == 2:
        (a, b), disk = runs, runs[1]["disk_mib"] - runs[0]["disk_mib"]
        result["slopes"] = {s: (b["steps"][s]["peak_rss_mib"] - a["steps"][s]["peak_rss_mib"]) / disk for s in a["steps"]}
    name = "scale" if args.preset == "depth" else f"scale-{args.preset}"
    out = REPO / "bench" / "results"
    write_results(out, name, result, markdown(result))


if __name__ == "__main__":
    main()
