"""What llama.cpp makes of the budget model's multiply-accumulates: its q8_0 file against a stock file of the same MACs.

    scripts/build_llama_cpp.sh && python bench/same_macs.py [--row block-uniform-ffn60:0.75] [--rounds 5] [--poll 50,0]

The MAC bound (dense/sliced weight multiply-accumulates per token) is what decode speed would gain if time went
with MACs alone.  A stock `llama` q8_0 file with the same MACs shows what llama.cpp itself gains at that size: the
dense SmolLM2 file (requantized by llama.cpp) with every MLP cut to its first n_ff neurons, n_ff chosen so that its
MACs match the sliced file's (its outputs are meaningless; only its speed is read).  The difference between the
two is what the sliced architecture costs beyond its MACs: the shortcut matrix of every block and the tied model's
two projections, each a matrix product of its own.  A checkpoint that kept every width and one MLP width (rotation
none) is also written in llama.cpp's own `llama` architecture (`--gguf-arch stock`, the default for it) and measured
beside them.  Each round is one `llama-bench` invocation (tg128, 2 threads) over the files per `--poll` setting, in
alternating orders; each ratio is against the dense file of its invocation.  `--poll` is how long llama.cpp's worker
threads busy-wait for the next operation before they sleep: 0 (the default here, as in the other benchmarks) so that
a shared machine's processes do not starve each other; 50 is llama.cpp's programs' own default, what a user gets.  Both
are worth measuring, since a token of this small model is several hundred small operations, each a wake-up at 0.
Writes <name>.json and <name>.md into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, spread, write_results
from gguf_in_llama_cpp import NEW_TOKENS, llama_bench, stock_dense_q8_0
from pareto import checkpoint_for, exports

#: llama.cpp's default --poll (its programs' worker threads busy-wait this long, 0-100, before they sleep)
LLAMA_CPP_POLL = 50
#: the tensors that hold MLP neurons, and the axis (in numpy's (rows, columns) order) that indexes them
NEURON_AXIS = {"ffn_gate.weight": 0, "ffn_up.weight": 0, "ffn_down.weight": 1}


def file_macs(path: Path) -> int:
    """Weight multiply-accumulates per token of a GGUF file: every matrix once (a tied token_embd read as the head)."""
    import gguf

    return sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2)


def neurons_for_macs(dense: Path, cut: int) -> int:
    """The MLP width n_ff (a multiple of q8_0's 32-value block) that takes the dense file's MACs closest to `cut` fewer."""
    import gguf

    reader = gguf.GGUFReader(dense)
    arch = reader.fields["general.architecture"].contents()
    n_ff, n_layer = (reader.fields[f"{arch}.{key}"].contents() for key in ("feed_forward_length", "block_count"))
    per_neuron = sum(int(np.prod(t.shape)) for t in reader.tensors if t.name.endswith(tuple(NEURON_AXIS))) // (n_ff * n_layer)
    return n_ff - round(cut / (per_neuron * n_layer) / 32) * 32


def cut_neurons(dense: Path, out: Path, n_ff: int) -> Path:
    """A copy of the stock q8_0 file `dense` whose MLPs keep their first `n_ff` neurons (atomic; cached)."""
    import gguf

    if out.is_file():
        return out
    reader = gguf.GGUFReader(dense)
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_suffix(".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = n_ff if field.name == f"{arch}.feed_forward_length" else field.contents()
        value_type = field.types[0]
        writer.add_key_value(field.name, value, value_type, sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = np.asarray(t.data)  # q8_0: (rows, bytes per row), 34 bytes per 32 values
        axis = next((a for suffix, a in NEURON_AXIS.items() if t.name.endswith(suffix)), None)
        if axis == 0:
            data = data[:n_ff]
        elif axis == 1:
            if t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
                raise ValueError(f"{t.name}: expected q8_0, got {t.tensor_type.name}")
            data = data[:, : n_ff // 32 * 34]
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


def stock_export(checkpoint: Path) -> Path | None:
    """The checkpoint's q8_0 file in llama.cpp's own architecture (cached), None when that cannot hold it."""
    from slicegpt_export.exporters.gguf_stock import export_stock_gguf, fits_stock_architecture

    if not fits_stock_architecture(checkpoint):
        return None
    path = WORK / f"{checkpoint.name}-stock-q8_0" / "model-q8_0.gguf"
    if not path.is_file():
        export_stock_gguf(checkpoint=checkpoint, out=path.parent, gguf_type="q8_0", overwrite=True)
    return path


def rounds_of(files: dict[str, Path], rounds: int, polls: list[int]) -> dict[int, dict[str, list[float]]]:
    """tg128 tokens/s of every file per `--poll` setting and round: one llama-bench invocation per setting each round,
    in alternating orders (the settings interleaved, so a drift of the machine's speed reaches them alike)."""
    measured: dict[int, dict[str, list[float]]] = {poll: {name: [] for name in files} for poll in polls}
    for n in range(rounds):
        order = dict(reversed(files.items())) if n % 2 else files
        for poll in polls:
            for name, m in llama_bench(order, poll=poll).items():
                measured[poll][name].append(m[f"tg{NEW_TOKENS}"]["tok_s"])
            print(json.dumps({"round": n + 1, "poll": poll, **{name: round(v[-1], 1) for name, v in measured[poll].items()}}),
                  file=sys.stderr)  # fmt: skip
    return measured


def poll_name(poll: int) -> str:
    return f"`--poll {poll}`" + (" (llama.cpp's default)" if poll == LLAMA_CPP_POLL else "")


def markdown(result: dict) -> str:
    lines = ["| q8_0 file | threads wait | MACs/token | bound | tg128 tok/s (median) | speed-up (median; range) | of the bound |",
             "|---" * 7 + "|"]  # fmt: skip
    for poll, files in result["polls"].items():
        for name, r in files["files"].items():
            s = r["speedup"]
            lines.append(f"| {name} | {poll_name(int(poll))} | {r['macs'] / 1e6:.1f}M | {r['bound']:.2f}x | {statistics.median(r['tok_s']):.1f} | "
                         f"{s['median']:.2f}x; {s['min']:.2f}-{s['max']:.2f}x | {s['median'] / r['bound']:.0%} |")  # fmt: skip
    against = "; ".join(f"{name}, {poll_name(int(poll))}: {a['median']:.2f}x (median; {a['min']:.2f}-{a['max']:.2f}x)"
                        for poll, files in result["polls"].items() for name, a in files["vs_stock"].items())  # fmt: skip
    note = (f"{result['rounds']} rounds of `llama-bench` (tg128, 2 threads), one invocation per `--poll` setting each round, in "
            "alternating orders; each speed-up against the dense file of its invocation.  The stock file is the dense one with "
            f"every MLP cut to its first {result['n_ff']} neurons, the same MACs as the sliced file: llama.cpp's own speed "
            f"at that size.  Each sliced file against it, invocation by invocation: {against}.")  # fmt: skip
    lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", default="block-uniform-ffn60:0.75", help="pareto.py's name of the sliced checkpoint")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--poll", default="0", help=f"comma-separated llama-bench --poll settings (0-100; llama.cpp's default: {LLAMA_CPP_POLL})")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="same_macs", help="stem of the result files")
    args = parser.parse_args()
    checkpoint = checkpoint_for(args.row)
    dense, sliced, sliced_stock = stock_dense_q8_0(), exports(checkpoint)[1], stock_export(checkpoint)
    macs = {dense: file_macs(dense), sliced: file_macs(sliced)}
    n_ff = neurons_for_macs(dense, macs[dense] - macs[sliced])
    stock = cut_neurons(dense, WORK / f"llama-cpp-stock-ffn{n_ff}" / "model-q8_0.gguf", n_ff)
    macs[stock] = file_macs(stock)
    dense_name, stock_name, sliced_name = "dense (stock `llama`)", f"stock `llama`, MLPs cut to {n_ff} neurons", f"{args.row} (sliced, default q8_0)"
    files = {dense_name: dense, stock_name: stock, sliced_name: sliced}
    if sliced_stock is not None:
        files[f"{args.row} (sliced, `--gguf-arch stock` q8_0)"] = sliced_stock
        macs[sliced_stock] = file_macs(sliced_stock)
    measured = rounds_of(files, args.rounds, [int(p) for p in args.poll.split(",")])
    result = {"row": args.row, "rounds": args.rounds, "n_ff": n_ff, "polls": {}}
    for poll, tok_s in measured.items():
        result["polls"][str(poll)] = {
            "files": {name: {"macs": macs[path], "bound": macs[dense] / macs[path], "tok_s": tok_s[name],
                             "speedup": spread([v / d for v, d in zip(tok_s[name], tok_s[dense_name])])}
                      for name, path in files.items()},
            "vs_stock": {name: spread([v / s for v, s in zip(tok_s[name], tok_s[stock_name])]) for name in list(files)[2:]},
        }  # fmt: skip
    write_results(args.out, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
