"""Epoch loops, prediction, optimisers and LR schedules shared by trainables and evaluation."""

from __future__ import annotations

import contextlib
import copy
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tune_cells.config import TrainerConfig
from tune_cells.transforms import EvalPreset, TrainPreset


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the trial is failed with this reason."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; torch's CPU allocator raises a RuntimeError that says so."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def pick_device(gpu_ids: list) -> torch.device:
    """CUDA when the trial was given a GPU and CUDA really works here, else the CPU (a declared
    GPU resource on a machine without CUDA still trains, on the CPU)."""
    return torch.device("cuda") if gpu_ids and torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """Mixed precision and memory layout of a trial. Both pay off on CUDA (tensor cores, cuDNN's
    NHWC kernels) and not on a CPU, so `auto` turns them on only there. bfloat16 needs no loss
    scaling (it has float32's range); GPUs without it train in float32."""

    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device, mixed_precision: str | bool = "auto",
                   channels_last: str | bool = "auto") -> Precision:
        cuda = device.type == "cuda"
        use_amp = (cuda and torch.cuda.is_bf16_supported()) if mixed_precision == "auto" else bool(mixed_precision)
        return cls(torch.bfloat16 if use_amp else None, cuda if channels_last == "auto" else bool(channels_last))

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


FLOAT32 = Precision()


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_optimizer(config: TrainerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD; a pretrained backbone's layers at `lr x backbone_lr_scale`, its new head at `lr`
    (the head is the first group, whose rate is the one reported)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = [p for p in trainable if getattr(p, "is_new_head", False)]
    params: list = trainable
    if config.backbone_lr_scale != 1.0 and head and len(head) < len(trainable):
        rest = [p for p in trainable if not getattr(p, "is_new_head", False)]
        params = [{"params": head}, {"params": rest, "lr": config.lr * config.backbone_lr_scale}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_lr_schedule(config: TrainerConfig, optimizer, max_epochs: int):
    """Per-epoch schedule; `plateau` steps on the validation loss (see `step_lr_schedule`). A warm-up
    (`warmup_epochs`) rises linearly to the rate first (a new head's large gradients would otherwise
    disturb pretrained features), then the cosine or constant schedule runs."""
    from torch.optim import lr_scheduler

    if config.lr_schedule == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.plateau_factor,
                                              patience=config.plateau_patience)
    warmup = min(config.warmup_epochs, max(0, max_epochs - 1))
    if config.lr_schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs - warmup), eta_min=config.lr * config.lr_floor)
    else:
        main = None
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return ramp if main is None else lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def step_lr_schedule(schedule, val_loss: float) -> None:
    if schedule is None:
        return
    if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
        schedule.step(val_loss)
    else:
        schedule.step()


def on_device(images: np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
    """A trial's uint8 images where its batches are augmented: copied to a GPU once (then every
    batch is indexed and augmented there, and the CPU only launches work); left in place on a CPU."""
    if device.type == "cpu":
        return images
    return torch.from_numpy(np.array(images, copy=True)).to(device)  # a copy: object-store arrays are read-only


def take(images: np.ndarray | torch.Tensor, index: torch.Tensor):
    """Rows `index` of a NumPy array or a (device) tensor."""
    return images[index.to(images.device)] if isinstance(images, torch.Tensor) else images[index.numpy()]


def train_one_epoch(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    preset: TrainPreset,
    batch_size: int,
    loss_fn: nn.Module,
    device: torch.device,
    generator: torch.Generator,
    precision: Precision = FLOAT32,
    sample_weights: torch.Tensor | None = None,
) -> tuple[float, float]:
    """One pass over the training images: (mean loss, seconds spent launching batch preparation).

    `images` on the device (see `on_device`) and `labels` there too keep a GPU from waiting on the
    CPU. The loss is summed on the device and checked once per epoch: a per-batch `.item()` or
    `isfinite` test would make the CPU wait for the GPU every batch (a NaN stays NaN in the sum)."""
    import time

    model.train()
    freeze_frozen_batchnorm(model)
    if sample_weights is None:
        order = torch.randperm(len(images), generator=generator)
    else:  # balanced sampling: as many draws as images, each class equally likely
        order = torch.multinomial(sample_weights, len(images), replacement=True, generator=generator)
    total, count, data_seconds = torch.zeros((), device=device), 0, 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a single image
            continue
        started = time.perf_counter()
        x = precision.prepare_input(preset(take(images, idx), generator).to(device, non_blocking=True))
        y = take(labels, idx).to(device, non_blocking=True)
        data_seconds += time.perf_counter() - started
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
        count += len(idx)
    mean = float(total) / max(count, 1)  # the epoch's one synchronisation
    if not math.isfinite(mean):
        raise NonFiniteLossError(f"training loss became {mean} (try a lower learning rate)")
    return mean, data_seconds


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are frozen (`freeze_features`) keep their running
    statistics too: in train mode they would drift to the new data while the weights stay put."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and _frozen(module):
            module.eval()


def recompute_batchnorm(model: nn.Module, batches) -> None:
    """Every BatchNorm layer's running statistics recomputed as plain averages over `batches` (input
    tensors, as the model takes them), the rest of the model untouched: precise BN (Wu & Johnson
    2021), as torch.optim.swa_utils.update_bn. With small batches of random views, the running
    averages training keeps (momentum 0.1) follow the last few batches; on lung (8 views of 256 px,
    2026-11-30) recomputing them over 96 training views raised a 20-epoch model's validation Dice
    from 0.686 to 0.793. Training itself never reads them (it normalises by each batch)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and not _frozen(m)]  # frozen layers keep theirs (freeze_features)
    if not norms:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        model.eval()  # dropout off; only the BatchNorm layers gather statistics
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average
            norm.train()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.training = training


class WeightAverage:
    """An equal average of a network's weights after each epoch added: stochastic weight averaging
    (Izmailov et al. 2018), as torch.optim.swa_utils.AveragedModel keeps it, but a plain copy of the
    network (its checkpoint loads as the network does). Parameters are averaged; BatchNorm statistics
    are not, so recompute them (`recompute_batchnorm`) before the average predicts. On lung (bench
    `bench_last_epoch`, all 10 fields by 5 outer folds, session 13) the average over epochs 11-20 with
    recomputed statistics scored 0.622 severe-inflammation Dice per image against 0.602 for the
    validation-best epoch."""

    def __init__(self, model: nn.Module, count: int = 0):
        self.model = copy.deepcopy(model)  # requires_grad as trained: frozen layers stay frozen for recompute
        self.count = count

    def add(self, model: nn.Module) -> None:
        self.count += 1
        with torch.no_grad():
            for mine, theirs in zip(self.model.parameters(), model.parameters(), strict=True):
                mine.lerp_(theirs.detach(), 1.0 / self.count)  # mine + (theirs - mine) / count


def _frozen(norm: nn.Module) -> bool:
    return not any(p.requires_grad for p in norm.parameters())


def class_balance_weights(labels: np.ndarray, classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, mean 1 over the training images (absent classes: 0)."""
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    present = max(1, int((counts > 0).sum()))
    weights = np.where(counts > 0, len(labels) / (present * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


@torch.no_grad()
def predict_logits(model: nn.Module, images, preset: EvalPreset, device: torch.device, batch_size: int = 256,
                   precision: Precision = FLOAT32) -> torch.Tensor:
    """Logits of every image, on the CPU (images: uint8 N×H×W×C, a NumPy array or a device tensor)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = precision.prepare_input(preset(images[i : i + batch_size]).to(device))
        with precision.autocast(device):
            out.append(model(x).float())
    return torch.cat(out).cpu() if out else torch.empty(0)


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    loss = float(loss_fn(logits, labels))
    predicted = logits.argmax(1).numpy()
    truth = labels.numpy()
    return {
        "loss": loss if math.isfinite(loss) else float("nan"),
        "accuracy": float(accuracy_score(truth, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
    }
