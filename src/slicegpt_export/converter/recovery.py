"""Recovery fine-tuning: the sliced model learns to follow the dense one, then the learning is merged away.

SliceGPT's RFT (paper section 4) fine-tunes the sliced model with LoRA on a dataset.  Here
the teacher is the dense model itself: LoRA adapters (``peft``) on every linear of the
sliced model (and, optionally, the shortcut matrices ``Q_l^T Q_{l+1}`` trained in full) are
trained to minimise

    KL(p_dense || p_sliced) = sum_v p_dense(v) (log p_dense(v) - log p_sliced(v))

per next-token position of the calibration windows.  The dense model's distributions are
computed once before training and kept as their top-k tokens plus the remaining mass, so
the teacher leaves memory before training starts and costs one forward pass per window
however many passes training makes; the KL is then the one between the two distributions
coarsened to those k tokens and one "rest" bucket (at most the full KL, equal to it when the
sliced model spreads the rest like the dense one).  ``teacher_topk=0`` computes the full
distribution on the fly instead.  ``loss="ce"`` trains on plain next-token cross-entropy (the
paper's RFT), for comparison.  Afterwards the adapters are merged into the weights
(W <- W + (alpha / r) B A), so the model keeps its shapes and the checkpoint format, every
exporter and every validation stay as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slicegpt_export.atomic import atomic_directory
from slicegpt_export.checkpoint import (
    CONFIG_NAME,
    SECTION,
    build_checked,
    lazy_tensors,
    read_config,
    read_tensors,
    save_checkpoint,
    weight_files,
)
from slicegpt_export.converter.convert import SliceSummary, fused_model, slice_checkpoint
from slicegpt_export.converter.mixture import DenseWriter, calibration_windows
from slicegpt_export.device import resolve_device
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import ResidualStage, SlicedModel
from slicegpt_export.sources.models import load_source
from slicegpt_export.sources.text import window_bos

logger = logging.getLogger(__name__)

LOSSES = ("kl", "ce")


@dataclasses.dataclass(frozen=True)
class RecoverySettings:
    """How recovery trains; recorded in the checkpoint's ``slicegpt.recovery`` section."""

    steps: int
    loss: str = "kl"  # "kl": KL(dense || sliced); "ce": next-token cross-entropy (the paper's RFT)
    #: rank and learning rate: on SmolLM2 at 0.25 (mixed calibration, 150 steps) each change measured was worse on every
    #: measure (bench/results/quality.md): lr 5e-4 / 3e-3, rank 64 (alpha 128) against the defaults' WikiText-2 42.37,
    #: python-stdlib 37.53, held-out KL 0.811: 42.91 / 43.53 / 42.88, 37.86 / 45.52 / 48.47, 0.817 / 0.896 / 0.884
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA scale alpha (the update is alpha / r * B A)
    lr: float = 1e-3  # peak learning rate (linear warm-up, cosine decay to zero)
    warmup: float = 0.1  # fraction of the steps spent warming up
    batch_size: int = 2  # windows per step
    seqlen: int = 512  # longer calibration windows are cut into pieces of this many tokens
    #: the shortcut matrices train in full beside the adapters; off, since on SmolLM2 at 0.25 (150 steps) training them
    #: was worse on every measure (bench/results/quality.md), trained against frozen: mixed calibration WikiText-2
    #: 42.41 / 42.37, python-stdlib 45.19 / 37.53, held-out KL 0.883 / 0.811, top-1 68.5% / 69.2%; WikiText-2
    #: calibration 37.13 / 37.00, 282.7 / 239.5, 1.771 / 1.678, 55.1% / 56.4%; at the 0.75 budget (WikiText-2
    #: calibration) close, frozen worse on WikiText-2 only: 38.89 / 40.11, 214.8 / 209.7, 1.633 / 1.618, 57.7% / 57.4%
    train_shortcuts: bool = False
    shortcut_lr: float = 1e-4  # their peak learning rate when trained (at the adapters' 1e-3 they diverge within steps)
    teacher_topk: int = 64  # dense distributions kept as top-k + rest, computed once; 0: full distributions on the fly
    autocast: bool = True  # bfloat16 matrix products (weights, adapters and the loss stay float32)
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1:
            raise SliceGPTError(f"recovery needs at least one step, got {self.steps}")
        if self.loss not in LOSSES:
            raise SliceGPTError(f"unknown recovery loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        if self.rank < 1 or self.batch_size < 1 or self.seqlen < 2 or not (self.lr > 0 and self.shortcut_lr > 0) or self.teacher_topk < 0:
            raise SliceGPTError(f"recovery settings out of range: {self}")


@dataclasses.dataclass
class RecoveryResult:
    settings: RecoverySettings
    seconds: float
    first_loss: float
    last_loss: float  # mean over the last tenth of the steps
    trainable_parameters: int
    losses: list[float] = dataclasses.field(default_factory=list)  # every step's loss

    def record(self) -> dict[str, Any]:
        """What the checkpoint's ``recovery`` section holds."""
        return {**dataclasses.asdict(self.settings), "seconds": round(self.seconds, 1), "first_loss": round(self.first_loss, 5),
                "last_loss": round(self.last_loss, 5), "trainable_parameters": self.trainable_parameters}  # fmt: skip


def adapter_targets(model: nn.Module) -> list[str]:
    """Names of the linears that get adapters: every nn.Linear whose weight no other module shares.

    A weight shared with another module (a head tied to the embedding) is left alone, since
    merging an update into it would change the other module too.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and owners[m.weight.data_ptr()] == 1]


@contextlib.contextmanager
def lora_adapters(model: nn.Module, settings: RecoverySettings) -> Iterator[list[nn.Parameter]]:
    """Inject LoRA adapters into `model` for the block and yield their parameters; merge and remove them on success.

    Adapter initialisation (A: Kaiming uniform, B: zero, so training starts from the sliced
    model) draws from a generator seeded with ``settings.seed``; the global RNG is untouched.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    targets = adapter_targets(model)
    for name in targets:  # slicing replaced the weights; peft sizes the adapters from these attributes
        linear = model.get_submodule(name)
        linear.out_features, linear.in_features = linear.weight.shape
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, bias="none", target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        tuner = LoraModel(model, config, "default")
    try:
        yield [p for n, p in model.named_parameters() if "lora_" in n]
        tuner.merge_and_unload()
    except BaseException:
        tuner.unload()
        raise
    finally:
        if hasattr(model, "peft_config"):
            del model.peft_config


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`model` on `device` for the block, on the CPU afterwards."""
    try:
        yield model.to(device)
    finally:
        model.to("cpu")


def residual_stages(model: SlicedModel) -> list[ResidualStage]:
    return [stage for layer in model.layers for stage in layer.stages if stage.shortcut is not None]


@contextlib.contextmanager
def trainable_shortcuts(model: SlicedModel, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """The shortcut matrices as leaf tensors that require grad for the block (plain tensors again afterwards)."""
    stages = residual_stages(model) if enabled else []
    for stage in stages:
        stage.shortcut = stage.shortcut.detach().clone().requires_grad_(True)
    try:
        yield [stage.shortcut for stage in stages]
    finally:
        for stage in stages:
            stage.shortcut = stage.shortcut.detach()


def training_windows(windows: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Calibration windows (n, T) cut into pieces of `seqlen` tokens (n * (T // seqlen), seqlen); shorter ones kept whole."""
    if windows.shape[1] <= seqlen:
        return windows
    pieces = windows.shape[1] // seqlen
    return windows[:, : pieces * seqlen].reshape(-1, seqlen)


def learning_rate(step: int, settings: RecoverySettings) -> float:
    """Linear warm-up over the first `warmup` of the steps, then cosine decay to zero."""
    warm = max(1, round(settings.warmup * settings.steps))
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(1, settings.steps - warm)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions; logits (B, T, V)."""
    s = F.log_softmax(student_logits.float().flatten(0, 1), dim=-1)  # (B*T, V)
    t = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@dataclasses.dataclass
class TopK:
    """The teacher's next-token distributions as their k most likely tokens: log-probabilities and ids, (n, T, k)."""

    logprobs: torch.Tensor  # float32
    ids: torch.Tensor  # int64

    def __getitem__(self, rows: torch.Tensor) -> TopK:
        return TopK(self.logprobs[rows], self.ids[rows])

    def to(self, device: torch.device) -> TopK:
        return TopK(self.logprobs.to(device), self.ids.to(device))


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module, data: torch.Tensor, *, k: int, batch_size: int, device: torch.device, autocast: bool, progress: bool
) -> TopK:
    """Top-k log-probabilities of the teacher at every position of `data` (n, T), computed in batches."""
    logprobs, ids = [], []
    for batch in tqdm(data.split(batch_size), desc="recovery: dense distributions", unit="batch", disable=not progress):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = teacher(batch.to(device)).logits
        lp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        values, indices = lp.topk(k, dim=-1)
        logprobs.append(values.cpu())
        ids.append(indices.cpu())
    return TopK(torch.cat(logprobs), torch.cat(ids))


def topk_distillation_loss(student_logits: torch.Tensor, target: TopK) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus one bucket for the rest.

    With S the top-k set, p_R = 1 - sum_S p and q_R = 1 - sum_S q:
    KL = sum_{v in S} p_v (log p_v - log q_v) + p_R (log p_R - log q_R).
    """
    s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, target.ids)  # (B, T, k)
    p = target.logprobs.exp()
    top = (p * (target.logprobs - s)).sum(-1)  # (B, T)
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    log_q_rest = torch.log1p(-s.exp().sum(-1).clamp(max=1 - 1e-7))
    return (top + p_rest * (p_rest.log() - log_q_rest)).mean()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def batch_order(count: int, settings: RecoverySettings) -> Iterator[torch.Tensor]:
    """Indices of the windows of each step: shuffled passes over all windows, seeded."""
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < settings.batch_size:
            order = torch.cat((order, torch.randperm(count, generator=generator)))
        yield order[: settings.batch_size]
        order = order[settings.batch_size :]


def recover(
    student: SlicedModel,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    *,
    settings: RecoverySettings,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> RecoveryResult:
    """Fine-tune `student` in place on the calibration `windows` (n, T); the teacher (the dense model) is needed for "kl".

    Both models are moved to `device` for the run and back to the CPU afterwards.
    """
    settings.check()
    if settings.loss == "kl" and teacher is None:
        raise SliceGPTError("distillation (loss kl) needs the dense model as teacher")
    data = training_windows(windows, settings.seqlen)
    use_teacher = teacher if settings.loss == "kl" else None
    start = time.perf_counter()
    losses: list[float] = []
    targets = None
    if use_teacher is not None and settings.teacher_topk:
        with on_device(use_teacher, device):
            targets = teacher_topk(use_teacher, data, k=settings.teacher_topk, batch_size=settings.batch_size, device=device,
                                   autocast=settings.autocast, progress=progress)  # fmt: skip
        use_teacher = None
    student.to(device)
    if use_teacher is not None:
        use_teacher.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.autocast)
    try:
        with lora_adapters(student, settings) as adapters, trainable_shortcuts(student, settings.train_shortcuts) as shortcuts:
            params = adapters + shortcuts
            groups = [{"params": adapters, "lr_scale": 1.0}, {"params": shortcuts, "lr_scale": settings.shortcut_lr / settings.lr}]
            optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, weight_decay=0.0)
            batches = batch_order(data.shape[0], settings)
            bar = tqdm(range(settings.steps), desc=f"recovery ({settings.loss})", unit="step", disable=not progress)
            for step in bar:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, settings) * group["lr_scale"]
                rows = next(batches)
                ids = data[rows].to(device)  # (B, T)
                with torch.enable_grad():
                    with autocast:
                        logits = student(ids).logits  # (B, T, V)
                    if targets is not None:
                        loss = topk_distillation_loss(logits, targets[rows].to(device))
                    elif use_teacher is not None:
                        with torch.no_grad(), autocast:
                            target = use_teacher(ids).logits
                        loss = distillation_loss(logits, target)
                    else:
                        loss = next_token_loss(logits, ids)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix({settings.loss: f"{losses[-1]:.4f}"})
            trainable = sum(p.numel() for p in params)
    finally:
        student.to("cpu")
        if use_teacher is not None:
            use_teacher.to("cpu")
    tail = losses[-max(1, len(losses) // 10) :]
    result = RecoveryResult(settings, time.perf_counter() - start, losses[0], sum(tail) / len(tail), trainable, losses)
    logger.info("recovery: %d steps in %.0f s, %s %.4f -> %.4f", settings.steps, result.seconds, settings.loss,
                result.first_loss, result.last_loss)  # fmt: skip
    return result


def copy_side_files(checkpoint: Path, target: Path) -> None:
    """Copy a checkpoint's files other than its weights and config (tokenizer, eigenvalues, GGUF metadata)."""
    skip = {p.name for p in weight_files(checkpoint)} | {CONFIG_NAME, "model.safetensors.index.json"}
    for f in Path(checkpoint).iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, target / f.name)


def recover_checkpoint(
    *,
    checkpoint: Path,
    out: Path,
    steps: int,
    loss: str = "kl",
    calib: str | list[str] | None = None,
    calib_samples: int | None = None,
    calib_seqlen: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> RecoveryResult:
    """Recovery fine-tuning of a sliced checkpoint, written to `out` as an ordinary sliced checkpoint.

    The teacher is the checkpoint's dense source (fused); the training windows are the
    checkpoint's own calibration windows unless `calib` (and the sizes) say otherwise.
    `settings` override :class:`RecoverySettings` fields (rank, lr, batch_size, ...).
    """
    checkpoint = Path(checkpoint)
    cfg, full = read_config(checkpoint)
    recorded = cfg.calibration
    options = RecoverySettings(steps=steps, loss=loss, seed=recorded.get("seed", 0) if seed is None else seed, **settings)
    options.check()
    dev = resolve_device(device)
    if not cfg.source_model:
        raise SliceGPTError(f"{checkpoint} does not record its dense source model, which recovery needs as teacher")
    work_dtype = getattr(torch, recorded.get("dtype", "float32"))
    source = load_source(cfg.source_model, dtype=work_dtype)
    teacher, dense_cfg, _ = fused_model(source)
    stored = lazy_tensors(checkpoint)
    stored_dtype = stored.stored_dtype(next(iter(stored)))  # the checkpoint's own dtype, kept on writing
    student = build_checked(cfg, read_tensors(checkpoint, dtype=work_dtype))
    windows, data = calibration_windows(
        calib if calib is not None else recorded.get("source"),
        source.tokenizer,
        samples=calib_samples or recorded.get("samples", 128),
        seqlen=min(calib_seqlen or recorded.get("seqlen", 2048), dense_cfg.max_position_embeddings),
        seed=options.seed,
        writer=DenseWriter(teacher, source.tokenizer, device=dev, progress=progress),
        bos=window_bos(source.tokenizer, cfg.bos_windows),
    )
    result = recover(student, teacher if options.loss == "kl" else None, windows, settings=options, device=dev, progress=progress)
    cfg.recovery = {**result.record(), "data": {**data, "samples": int(windows.shape[0]), "seqlen": int(windows.shape[1])}}
    if recorded.get("source") == data.get("source") and recorded.get("samples") == windows.shape[0]:
        cfg.recovery["data"] = "calibration"  # the checkpoint's own calibration windows
    with atomic_directory(Path(out), overwrite=overwrite or Path(out).resolve() == checkpoint.resolve()) as tmp:
        copy_side_files(checkpoint, tmp)
        save_checkpoint(tmp, tensors=student.named_weights(), config=cfg, base_config={k: v for k, v in full.items() if k != SECTION},
                        dtype=stored_dtype)  # fmt: skip
    return result


def slice_and_recover(*, out: Path, recover_steps: int = 0, recover_loss: str = "kl", overwrite: bool = False,
                      **slice_options: Any) -> tuple[SliceSummary, RecoveryResult | None]:  # fmt: skip
    """slice_checkpoint, then (with recover_steps > 0) recovery fine-tuning on the same calibration windows.

    The sliced checkpoint is written to a temporary folder beside `out` first, so `out` only
    ever holds the finished, recovered checkpoint.
    """
    if recover_steps <= 0:
        return slice_checkpoint(out=out, overwrite=overwrite, **slice_options), None
    RecoverySettings(steps=recover_steps, loss=recover_loss).check()
    with atomic_directory(Path(out), overwrite=overwrite) as final, tempfile.TemporaryDirectory(prefix=f".{final.name}.sliced-", dir=final.parent) as tmp:
        summary = slice_checkpoint(out=Path(tmp) / "sliced", **slice_options)
        result = recover_checkpoint(checkpoint=Path(tmp) / "sliced", out=final, steps=recover_steps, loss=recover_loss,
                                    device=slice_options.get("device", "auto"), overwrite=True,
                                    progress=slice_options.get("progress", True))  # fmt: skip
        summary.config = read_config(final)[0]
    summary.out = Path(out)
    return summary, result
