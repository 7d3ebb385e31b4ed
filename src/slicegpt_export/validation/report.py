"""Validation of every artifact in a folder against the PyTorch reference, written as report.md/.json and plots."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slicegpt_export.atomic import atomic_file
from slicegpt_export.checkpoint import read_config, read_spectra
from slicegpt_export.device import resolve_device
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.sources.text import text_windows, window_bos
from slicegpt_export.sources.tokenizer import load_tokenizer
from slicegpt_export.validation.perplexity import LogitsFn, perplexity, reference_logits_fn
from slicegpt_export.validation.runners import is_sliced_checkpoint
from slicegpt_export.validation.streamed import open_reference

logger = logging.getLogger(__name__)

COMPARE_WINDOWS = 2  # evaluation windows on which logits are compared with the reference
#: what the export stage's own check measures, said beside every table of this module's measure
EXPORT_CHECK_NOTE = (
    "The check each export logs when it is written compares on random-token prompts instead, where lossy types "
    "(f16, q8_0, int8 ...) differ more than on text; perplexity judges them."
)


@dataclasses.dataclass
class ArtifactResult:
    name: str  # "reference", "onnx (fp32)", "gguf q8_0", "dense source"
    path: str
    size_mb: float | None = None
    perplexity: float | None = None  # on the first evaluation text
    perplexities: dict[str, float] = dataclasses.field(default_factory=dict)  # evaluation text name -> perplexity
    max_abs_diff: float | None = None  # against the reference, over the compared windows
    mean_abs_diff: float | None = None
    kl_divergence: float | None = None  # mean KL(reference || artifact) per token, nats
    top1_agreement: float | None = None
    compared_on: str | None = None  # the windows the differences were measured on


@dataclasses.dataclass
class Artifacts:
    checkpoint: Path
    onnx: list[Path]
    gguf: list[Path]


def find_artifacts(directory: Path) -> Artifacts:
    """The sliced checkpoint, ONNX folders and GGUF files in `directory` or one level below."""
    directory = Path(directory)
    candidates = [directory, *sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))]
    checkpoints = [p for p in candidates if is_sliced_checkpoint(p)]
    if not checkpoints:
        raise SliceGPTError(f"no sliced checkpoint (config.json with a slicegpt section) in {directory} or its sub-folders")
    onnx = [p for p in candidates if (p / "model.onnx").is_file()]
    gguf = sorted(f for p in candidates for f in p.glob("*.gguf"))
    return Artifacts(checkpoints[0], onnx, gguf)


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.name.startswith("model")]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Max and mean |difference|, mean KL(reference || other) and top-1 agreement of (N, V) logits."""
    ref, oth = reference.float().cpu().flatten(0, -2), other.float().cpu().flatten(0, -2)
    kl = F.kl_div(F.log_softmax(oth, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
    return {
        "max_abs_diff": (ref - oth).abs().max().item(),
        "mean_abs_diff": (ref - oth).abs().mean().item(),
        "kl_divergence": max(kl.item(), 0.0),  # float noise can make an exact match read -1e-9
        "top1_agreement": (ref.argmax(-1) == oth.argmax(-1)).float().mean().item(),
    }


def artifact_runners(artifacts: Artifacts, *, n_ctx: int) -> list[tuple[str, Path, Callable[[], LogitsFn]]]:
    """(name, path, factory of a logits function) for every exported artifact; GGUF files also in llama.cpp when built."""
    from slicegpt_export.validation.gguf_runner import open_gguf_model
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel, llama_cpp_available
    from slicegpt_export.validation.onnx_runner import OnnxDecoder

    runners: list[tuple[str, Path, Callable[[], LogitsFn]]] = []
    for p in artifacts.onnx:
        runners.append(("onnx" if p.name == "onnx" else f"onnx ({p.name})", p, lambda p=p: OnnxDecoder(p).logits))
    for f in artifacts.gguf:
        runners.append((f"gguf {f.stem.removeprefix('model-')}", f, lambda f=f: open_gguf_model(f).logits))
    if artifacts.gguf and llama_cpp_available():
        for f in artifacts.gguf:
            runners.append((f"llama.cpp {f.stem.removeprefix('model-')}", f, lambda f=f: LlamaCppModel(f, n_ctx=n_ctx).logits))
    return runners


def evaluation_ids(checkpoint: Path, text: Path, *, seqlen: int = 512, windows: int | None = 64) -> torch.Tensor:
    """The evaluation text tokenized once by the checkpoint's tokenizer, as (n, seqlen) windows shared by every artifact.

    `seqlen` is capped at the model's context: exported graphs hold rotary tables for that many positions.
    """
    cfg, _ = read_config(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    return text_windows(Path(text), tokenizer, seqlen=min(seqlen, cfg.max_position_embeddings), windows=windows,
                        bos=window_bos(tokenizer, cfg.bos_windows))  # fmt: skip


def describe_windows(ids: torch.Tensor, text: Path | Sequence[Path] | None) -> str:
    n, T = ids.shape
    texts = evaluation_texts(text)
    if not texts:
        return f"{n} windows of {T} random tokens (no evaluation text)"
    return f"the first {n} window{'s' if n > 1 else ''} of {T} tokens of {texts[0]}"


def text_name(text: Path) -> str:
    """How an evaluation text is named in tables: its file name, or the built-in text's name."""
    return Path(text).name or str(text)


def evaluation_texts(text: Path | Sequence[Path] | None) -> list[Path]:
    return [] if text is None else [Path(text)] if isinstance(text, (str, Path)) else [Path(t) for t in text]


@torch.no_grad()
def validate_directory(
    directory: Path, *, text: Path | Sequence[Path] | None, seqlen: int = 512, windows: int | None = 64, batch_size: int = 8,
    dense: bool = True, device: str | torch.device = "cpu", ids: torch.Tensor | None = None, stream: bool = False,
) -> list[ArtifactResult]:  # fmt: skip
    """Perplexity on each text and agreement with the reference of every artifact; the dense source's perplexity when at hand.

    Every artifact is measured on the same windows of each text, tokenized here once (`ids`: the
    first text's windows when already tokenized, see evaluation_ids).  Logits are compared on the
    first windows of the first text (random tokens without one).  The reference and the dense
    source run on `device`.  With `stream` the reference runs layer-streamed from the checkpoint's
    shards (validation.streamed) and the dense source, which would be loaded whole, is left out.
    """
    artifacts = find_artifacts(directory)
    cfg, _ = read_config(artifacts.checkpoint)
    seqlen = min(seqlen, cfg.max_position_embeddings)  # exported graphs hold rotary tables for this many positions
    dev = resolve_device(device)
    reference = open_reference(artifacts.checkpoint, device=dev, stream=stream)
    texts = evaluation_texts(text)
    windows_of = {
        text_name(t): ids if i == 0 and ids is not None else evaluation_ids(artifacts.checkpoint, t, seqlen=seqlen, windows=windows)
        for i, t in enumerate(texts)
    }  # fmt: skip
    if windows_of:
        ids = next(iter(windows_of.values()))
    elif ids is None:  # no evaluation text: agreement on random tokens only
        ids = torch.randint(0, cfg.vocab_size, (COMPARE_WINDOWS, seqlen), generator=torch.Generator().manual_seed(0))
    compare = ids[:COMPARE_WINDOWS]
    compared_on = describe_windows(compare, text)
    ref_logits = torch.cat(list(reference.logits(compare)))  # (COMPARE_WINDOWS, T, vocab)
    if text is not None:
        logger.info("perplexity of every artifact on %s; logit differences on %s", describe_windows(ids, text), compared_on)
    else:
        logger.info("no evaluation text, so no perplexity: logit differences on %s", compared_on)

    def evaluate(name: str, path: Path, measure: Callable[[torch.Tensor, str], float], compared: LogitsFn | None) -> ArtifactResult:
        """`measure(windows, label)` gives a perplexity; `compared` (an artifact's logits) is checked against the reference."""
        result = ArtifactResult(name, str(path), size_mb(path) if path.exists() else None)
        for label, text_ids in windows_of.items():
            result.perplexities[label] = measure(text_ids, name if len(windows_of) == 1 else f"{name} on {label}")
        if windows_of:
            result.perplexity = next(iter(result.perplexities.values()))
        if compared is not None:
            for k, v in agreement(ref_logits, compared(compare)).items():
                setattr(result, k, v)
            result.compared_on = compared_on
        logger.info("%s: perplexity %s, max |logit diff| %s, top-1 %s", name, fmt(result.perplexity, ".3f"),
                    fmt(result.max_abs_diff, ".3g"), fmt(result.top1_agreement, ".1%"))  # fmt: skip
        return result

    def measured_by(fn: LogitsFn) -> Callable[[torch.Tensor, str], float]:
        return lambda windows, label: perplexity(fn, windows, batch_size=batch_size, progress=True, label=label)

    results = [evaluate("reference", artifacts.checkpoint,
                        lambda windows, label: reference.perplexity(windows, batch_size=batch_size, progress=True, label=label), None)]  # fmt: skip
    for name, path, factory in artifact_runners(artifacts, n_ctx=max(seqlen, ids.shape[1])):
        fn = factory()
        results.append(evaluate(name, path, measured_by(fn), fn))
    source = cfg.source_model
    if stream and dense and texts:
        logger.info("no dense source perplexity: validating with the reference streamed, and the dense source would be loaded whole")
    elif dense and texts and source and Path(source).exists():
        from slicegpt_export.sources.models import dense_model, load_source

        model = dense_model(load_source(source)).to(dev)
        results.insert(0, evaluate("dense source", Path(source), measured_by(reference_logits_fn(model, dev)), None))
    return results


def agreement_note(results: list[ArtifactResult]) -> str:
    """What the table's logit differences were measured on, and how the export stage's own check differs."""
    compared = next((r.compared_on for r in results if r.compared_on), None)
    if compared is None:
        return ""
    return (f"Logit differences and top-1 agreement are against the PyTorch reference on {compared}; KL is mean "
            f"KL(reference || artifact) per token. {EXPORT_CHECK_NOTE}")  # fmt: skip


def kept_variance(spectra: dict[str, torch.Tensor], cfg: Any) -> dict[str, float]:
    """Fraction of each signal's variance (second moment) inside the kept principal directions."""
    widths = {"embedding": cfg.embedding_width}
    for i, w in enumerate(cfg.layers):
        widths[f"layers.{i}.attn_shortcut"] = w.attn_out
        widths[f"layers.{i}.mlp_shortcut"] = w.mlp_out
    return {k: (v[: widths[k]].sum() / v.sum()).item() for k, v in spectra.items() if k in widths}


def write_plots(directory: Path, results: list[ArtifactResult], checkpoint: Path, sweep: list[dict] | None = None) -> list[Path]:
    """PNG plots: eigenvalue spectra, kept variance per layer, perplexity per backend, and the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, _ = read_config(checkpoint)
    spectra = read_spectra(checkpoint)
    written = []
    if spectra:
        fig, ax = plt.subplots(figsize=(8, 5))
        names = [k for k in spectra if k.endswith(("mlp_shortcut", "attn_shortcut")) or k in ("embedding", "global")]
        cmap = plt.get_cmap("viridis")
        for n, name in enumerate(names):
            values = spectra[name].double().clamp(min=1e-12)
            ax.semilogy(torch.arange(1, values.numel() + 1), values / values.sum(), color=cmap(n / max(len(names) - 1, 1)), lw=0.8)
        ax.axvline(cfg.embedding_width, color="red", ls="--", label=f"kept width {cfg.embedding_width} of {cfg.hidden_size}")
        ax.set(xlabel="principal direction", ylabel="eigenvalue / trace", title="PCA spectra of the residual signals (dark: early, light: late)")
        ax.set_ylim(bottom=1e-7)
        ax.legend()
        written.append(save_figure(fig, directory / "spectra.png"))
        kept = kept_variance(spectra, cfg)
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(range(len(kept)), list(kept.values()), marker=".")
        ax.set(xlabel="signal (embedding, then attention/MLP output of each layer)", ylabel="kept variance fraction",
               title=f"Variance kept at sparsity {cfg.sparsity:g}", ylim=(min(kept.values()) - 0.02, 1.0))  # fmt: skip
        written.append(save_figure(fig, directory / "kept_variance.png"))
    with_ppl = [r for r in results if r.perplexity is not None]
    if with_ppl:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar([r.name for r in with_ppl], [r.perplexity for r in with_ppl], color="tab:blue")
        for k, r in enumerate(with_ppl):
            ax.text(k, r.perplexity, f"{r.perplexity:.2f}", ha="center", va="bottom")
        ax.set(ylabel="perplexity", title="Perplexity per backend")
        ax.tick_params(axis="x", rotation=20)
        written.append(save_figure(fig, directory / "perplexity.png"))
    if sweep:
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = [s["sparsity"] for s in sweep]
        ax.plot(xs, [s["perplexity"] for s in sweep], marker="o", color="tab:red")
        ax.set(xlabel="sparsity", ylabel="perplexity", title="Perplexity and parameters against sparsity")
        ax2 = ax.twinx()
        ax2.plot(xs, [s["parameters"] / 1e6 for s in sweep], marker="s", color="tab:gray")
        ax2.set_ylabel("parameters (M, shortcuts included)")
        written.append(save_figure(fig, directory / "sweep.png"))
    return written


def save_figure(fig: Any, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(results: list[ArtifactResult]) -> str:
    """One row per artifact; one perplexity column per evaluation text when there are several."""
    names = list(dict.fromkeys(n for r in results for n in r.perplexities))
    ppl_heads = [f"perplexity ({n})" for n in names] if len(names) > 1 else ["perplexity"]
    heads = ["artifact", *ppl_heads, "max abs diff", "mean abs diff", "KL", "top-1", "size (MiB)"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in results:
        ppls = [r.perplexities.get(n) for n in names] if len(names) > 1 else [r.perplexity]
        lines.append(
            f"| {r.name} | {' | '.join(fmt(p, '.3f') for p in ppls)} | {fmt(r.max_abs_diff, '.3g')} | {fmt(r.mean_abs_diff, '.3g')} "
            f"| {fmt(r.kl_divergence, '.3g')} | {fmt(r.top1_agreement, '.1%')} | {fmt(r.size_mb, '.1f')} |"
        )
    return "\n".join(lines)


def size_lines(cfg: Any) -> list[str]:
    """The paper's slicing fraction beside the honest fractions: stored parameters and weight MACs per token vs dense."""
    size = cfg.size
    if "parameters" not in size:
        return []
    return [
        "| measure | dense | sliced | fraction of dense |",
        "|---|---|---|---|",
        f"| hidden width (the paper's slicing fraction) | {cfg.hidden_size} | | {1 - cfg.sparsity:.3f} kept |",
        f"| stored parameters (every tensor, tied ones once) | {size['dense_parameters']:,} | {size['parameters']:,} | {size['parameter_fraction']:.3f} |",
        f"| weight multiply-accumulates per token | {size['dense_macs_per_token']:,} | {size['macs_per_token']:,} | {size['mac_fraction']:.3f} |",
    ]


def quality_markdown(quality: dict[str, Any]) -> list[str]:
    """The report's section on quality beyond the calibration domain: fidelity and greedy answers side by side."""
    body = ["## Beyond the calibration text", ""]
    fid = quality.get("fidelity")
    if fid:
        body += [
            f"Fidelity on the dense model's answers to {fid['prompts']} held-out chat prompts ({fid['tokens']:,} answer tokens, "
            f"never used for calibration or recovery): KL(dense || sliced) {fid['kl_divergence']:.4f} nats per token, "
            f"top-1 agreement {fid['top1_agreement']:.1%}.",
            "",
        ]
    answers = quality.get("answers") or []
    if answers:
        body += ["Greedy answers:", "", "| prompt | dense | sliced |", "|---|---|---|"]
        body += [f"| {cell(a['prompt'])} | {cell(a['dense'])} | {cell(a['sliced'])} |" for a in answers] + [""]
    return body


def cell(text: str) -> str:
    """Text for a markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(nothing)"


def write_report(directory: Path, results: list[ArtifactResult], *, checkpoint: Path, extra: dict[str, Any] | None = None,
                 sweep: list[dict] | None = None) -> Path:  # fmt: skip
    """report.json, report.md and the plots into `directory`."""
    cfg, _ = read_config(checkpoint)
    plots = write_plots(directory, results, checkpoint, sweep)
    data = {"config": cfg.to_dict(), "artifacts": [dataclasses.asdict(r) for r in results], "sweep": sweep, **(extra or {})}
    with atomic_file(directory / "report.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    widths = sorted({w.attn_in for w in cfg.layers})
    body = [
        f"# SliceGPT validation report: {cfg.model_type}, sparsity {cfg.sparsity:g}",
        "",
        f"Source: `{cfg.source_model}`. Width D = {cfg.hidden_size}; embedding {cfg.embedding_width}; "
        f"block widths {widths}; head input {cfg.head_in}. Slicing: {cfg.slicing}. Calibration: {cfg.calibration}.",
        "",
        *size_lines(cfg),
        "",
        markdown_table(results),
        "",
        agreement_note(results),
        "",
    ]
    if (extra or {}).get("quality"):
        body += quality_markdown(extra["quality"])
    if (extra or {}).get("zero_shot"):
        body += ["## Zero-shot (lm-eval-harness)", "", "```", json.dumps(extra["zero_shot"], indent=2), "```", ""]
    if sweep:
        body += ["## Sweep", "", "| sparsity | perplexity | parameters |", "|---|---|---|"]
        body += [f"| {s['sparsity']:g} | {s['perplexity']:.3f} | {s['parameters']:,} |" for s in sweep] + [""]
    body += [f"![{p.stem}]({p.name})" for p in plots]
    with atomic_file(directory / "report.md") as tmp:
        tmp.write_text("\n".join(body) + "\n")
    return directory / "report.md"
