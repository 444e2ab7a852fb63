"""Device check: does a trial keep its device busy? Runs on whatever device it finds, without Ray,
MLflow or Optuna (a lent GPU machine has torch alone), and prints, side by side in one run:

1. a trial's training images/s (its own trainer, validation and checkpointing included) against a
   bare loop over the same model, batch, threads, precision and pre-augmented tensors on the device;
2. images/s, device utilisation and memory with 1, 2 and 4 trial processes sharing the device;
3. the megabytes a trial checkpoints per epoch, against writing everything every epoch.

    ./run bench-device                 # the full check (~3-4 min on a GPU; run it first when one is lent)
    ./run bench-device --quick         # the short form CI runs (CPU, about a minute)

The data are generated (random uint8 images), since throughput does not depend on what they show.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bench_device")


@dataclass(frozen=True)
class Settings:
    model: str = "resnet18"
    image_size: int = 96
    store_size: int = 96
    batch_size: int = 64
    train_images: int = 4096
    val_images: int = 512
    epochs: int = 6  # the first is a warm-up (cuDNN autotuning, allocator), not timed
    checkpoint_every: int = 5
    threads: int = 1  # per trial process, as `--cpus-per-trial 1` gives a trial
    processes: tuple[int, ...] = (1, 2, 4)

    def config(self) -> dict:
        return {"model": self.model, "image_size": self.image_size, "batch_size": self.batch_size,
                "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "lr_schedule": "cosine", "flip": True,
                "rotate90": True, "color_jitter": 0.5, "checkpoint_every": self.checkpoint_every}


QUICK = Settings(model="resnet18", image_size=64, store_size=64, batch_size=32, train_images=256, val_images=64,
                 epochs=3, processes=(1, 2))


def trial_data(settings: Settings, seed: int = 0):
    from tune_cells.trainables.classification import ClassificationData

    rng = np.random.default_rng(seed)
    shape = (settings.store_size, settings.store_size, 3)
    images = rng.integers(0, 256, size=(settings.train_images + settings.val_images, *shape), dtype=np.uint8)
    labels = rng.integers(0, 4, size=len(images)).astype(np.int64)
    n = settings.train_images
    return ClassificationData(images[:n], labels[:n], images[n:], labels[n:], task="bench", classes=list("abcd"),
                              channels=3, store_size=settings.store_size, mean=(0.5,) * 3, std=(0.25,) * 3,
                              max_epochs=settings.epochs, seed=seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_session(checkpoint_dir: Path, cpus: int = 1):
    """A LocalSession on the GPU when there is one, noting when each epoch's report (after its
    validation and checkpoint) arrives: perf_counter for durations, wall time across processes."""
    from tune_cells.trainables.skeleton import LocalSession

    class TimedSession(LocalSession):
        def trial_info(self) -> dict:
            return {**super().trial_info(), "gpu_ids": [0] if torch.cuda.is_available() else []}

        def report(self, metrics, checkpoint_dir=None):
            super().report(metrics, checkpoint_dir)
            self.stamps.append(time.perf_counter())
            self.walls.append(time.time())

    session = TimedSession(checkpoint_dir=checkpoint_dir, cpus=cpus)
    session.stamps, session.walls = [], []
    return session


def timed_trial(settings: Settings) -> dict:
    """The project's own trainer, outside Ray: images/s over the timed epochs (validation and
    checkpoints included), each epoch's split into training, validation and checkpointing, and the
    MB checkpointed per epoch."""
    from tune_cells.trainables.classification import ClassificationTrainer

    torch.set_num_threads(settings.threads)
    validation: list[float] = []

    class TimedTrainer(ClassificationTrainer):
        def validate(self):
            started = time.perf_counter()
            metrics = super().validate()  # ends on the CPU (metrics are numbers): synchronised
            validation.append(time.perf_counter() - started)
            return metrics

    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        session = timed_session(Path(tmp) / "checkpoint", settings.threads)
        stamps, walls = session.stamps, session.walls
        trainer = TimedTrainer(settings.config(), trial_data(settings), session)
        started = time.perf_counter()
        trainer.run()
        full = _full_checkpoint_mb(trainer, Path(tmp) / "full")
    epochs = np.diff([started, *stamps])[1:]  # epoch 1 warms up
    epoch_work = np.array([r["epoch_time_s"] for r in session.results[1:]])  # training + validation
    total = float(epochs.sum())
    return {"images_per_s": settings.train_images / float(np.median(epochs)),
            "epoch_s": float(np.median(epochs)), "device": str(trainer.device),
            "share_validation": sum(validation[1:]) / total,
            "share_checkpoint": float((epochs - epoch_work).sum()) / total,
            "window": (walls[0], walls[-1]),  # the timed epochs
            "checkpoint_mb_per_epoch": sum(r["checkpoint_mb"] for r in session.results) / len(session.results),
            "full_checkpoint_mb": full, "precision": str(trainer.precision.autocast_dtype),
            "channels_last": trainer.precision.channels_last}


def _full_checkpoint_mb(trainer, directory: Path) -> float:
    from tune_cells.trainables.skeleton import checkpoint_bytes

    trainer.save(directory, trainer.data.max_epochs, full=True)
    return checkpoint_bytes(directory) / 1e6


def timed_bare_loop(settings: Settings) -> dict:
    """The same model, batch, threads and precision on pre-augmented tensors already on the device:
    forward, backward and step, nothing else. What a trial cannot beat."""
    from tune_cells.config import ClassificationConfig
    from tune_cells.model_io import ModelSpec
    from tune_cells.training import Precision, build_optimizer, pick_device
    from tune_cells.transforms import TrainPreset

    torch.set_num_threads(settings.threads)
    device = pick_device([0])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as a trial sets it
    config = ClassificationConfig.from_flat(settings.config(), strict=False)
    data = trial_data(settings)
    spec = ModelSpec(task="bench", architecture=config.model, classes=list(data.classes), channels=3,
                     store_size=settings.store_size, image_size=settings.image_size, mean=list(data.mean),
                     std=list(data.std), config=config.to_flat())
    precision = Precision.for_device(device, "auto", "auto")
    model = precision.prepare_model(spec.build().to(device))
    optimizer = build_optimizer(config, model)
    preset = TrainPreset(spec.preset(), flip=True, rotate90=True, color_jitter=0.5)
    generator = torch.Generator().manual_seed(0)
    x_all = torch.cat([preset(data.train_images[i : i + 512], generator)
                       for i in range(0, len(data.train_images), 512)]).to(device)
    y_all = torch.as_tensor(data.train_labels).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(settings.epochs):
        synchronize(device)
        started = time.perf_counter()
        model.train()
        for start in range(0, len(x_all) - 1, settings.batch_size):
            x = precision.prepare_input(x_all[start : start + settings.batch_size])
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast(device):
                loss = loss_fn(model(x).float(), y_all[start : start + settings.batch_size])
            loss.backward()
            optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    epoch = float(np.median(times[1:]))
    return {"images_per_s": settings.train_images / epoch, "epoch_s": epoch}


def timed_segmentation_trial(epochs: int = 3, size: int = 1024, views: int = 64, batch_size: int = 8) -> dict:
    """A U-Net trial (the lung kind's trainer) on generated fields: training views/s over the timed
    epochs, with the stitched validation of whole fields, checkpoints and (as lung.yaml sets
    `batchnorm_views` to its views per epoch) the BatchNorm recomputation before it included."""
    from tune_cells.trainables.segmentation import SegmentationData, SegmentationTrainer

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(6)]
    masks = [(rng.random((2, size, size)) < 0.3).astype(np.uint8) for _ in range(6)]
    data = SegmentationData(images[:4], masks[:4], images[4:], masks[4:], task="bench", targets=["a", "b"],
                            mean=(0.5,) * 3, std=(0.25,) * 3, max_epochs=epochs, seed=0, metric="val_dice")
    # the shipped lung space's resolution and view (full resolution since session 17), so the
    # stitched validation is timed at the size a lung trial stitches
    from tune_cells.search_spaces import load_space

    shipped = load_space("lung").fixed
    config = {"model": "unet", "lr": 1e-3, "batch_size": batch_size, "views_per_epoch": views,
              "batchnorm_views": views, "scale": shipped["scale"], "tile_size": shipped["tile_size"]}
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        session = timed_session(Path(tmp) / "checkpoint")
        stamps = session.stamps
        trainer = SegmentationTrainer(config, data, session)
        started = time.perf_counter()
        trainer.run()
    epoch = float(np.median(np.diff([started, *stamps])[1:]))
    return {"views_per_s": views / epoch, "epoch_s": epoch, "precision": str(trainer.precision.autocast_dtype),
            "val_dice": session.results[-1]["val_dice"]}


def _worker(settings: Settings, queue) -> None:
    queue.put(timed_trial(settings))


def shared_device(settings: Settings, processes: int) -> dict:
    """`processes` trials at once on the one device: their summed images/s, with utilisation and
    memory sampled while they run."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    sampler = DeviceSampler()
    workers = [context.Process(target=_worker, args=(settings, queue)) for _ in range(processes)]
    sampler.start()
    for worker in workers:
        worker.start()
    results = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    sampler.stop()
    # utilisation while every process trained (after their warm-up epochs, before the first finished)
    window = (max(r["window"][0] for r in results), min(r["window"][1] for r in results))
    return {"processes": processes, "images_per_s": sum(r["images_per_s"] for r in results),
            **sampler.summary(*window)}


class DeviceSampler:
    """GPU utilisation and memory every 0.2 s through nvidia-smi, while trials run (CPU: load average)."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []  # (wall time, utilisation %, memory MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            sample = gpu_sample()
            if sample is not None:
                self.samples.append((time.time(), *sample))

    def summary(self, start: float, end: float) -> dict:
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end] or [(u, m) for _, u, m in self.samples]
        if not inside:
            return {"utilisation_pct": None, "memory_mib": None, "samples": 0}
        return {"utilisation_pct": statistics.mean(u for u, _ in inside), "memory_mib": max(m for _, m in inside),
                "samples": len(inside)}


def gpu_sample() -> tuple[float, float] | None:
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=5).stdout
        utilisation, memory = (float(v) for v in out.strip().split(",")[:2])
        return utilisation, memory
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU, {os.cpu_count()} cores (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short form (CPU, CI): small data, 1-2 processes")
    parser.add_argument("--model", help="a registered classification model [resnet18]")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-images", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--threads", type=int, help="CPU threads per trial process [1]")
    parser.add_argument("--processes", help="comma-separated trial-process counts [1,2,4]")
    parser.add_argument("--segmentation", action="store_true", help="also time a U-Net trial (needs "
                        "segmentation-models-pytorch)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    overrides = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
                 "train_images": args.train_images, "epochs": args.epochs, "threads": args.threads}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.image_size:
        settings = replace(settings, store_size=args.image_size)
    if args.processes:
        settings = replace(settings, processes=tuple(int(p) for p in args.processes.split(",")))
    logging.basicConfig(level=logging.WARNING)

    print(f"device: {device_name()}")
    print(f"model {settings.model}, {settings.image_size} px, batch {settings.batch_size}, {settings.train_images} "
          f"training + {settings.val_images} validation images, {settings.epochs} epochs (first not timed), "
          f"{settings.threads} CPU thread(s) per trial", flush=True)
    trial = timed_trial(settings)
    bare = timed_bare_loop(settings)
    print(f"\n1. a trial against the bare loop ({trial['device']}, autocast {trial['precision']}, "
          f"channels-last {trial['channels_last']})")
    print(f"   trial (augmentation, validation, checkpoints): {trial['images_per_s']:9.0f} images/s")
    print(f"   bare loop (pre-augmented tensors, train only):  {bare['images_per_s']:9.0f} images/s")
    print(f"   trial / bare: {trial['images_per_s'] / bare['images_per_s']:.2f}; of the trial's time, validation "
          f"{trial['share_validation']:.0%}, checkpointing {trial['share_checkpoint']:.0%}", flush=True)

    print(f"\n2. trial processes sharing the device (batch {settings.batch_size} each)")
    shared = [shared_device(settings, p) for p in settings.processes]
    one = shared[0]["images_per_s"]
    for row in shared:
        util = "n/a" if row["utilisation_pct"] is None else f"{row['utilisation_pct']:.0f} %"
        memory = "n/a" if row["memory_mib"] is None else f"{row['memory_mib']:.0f} MiB"
        print(f"   {row['processes']} process(es): {row['images_per_s']:9.0f} images/s ({row['images_per_s'] / one:.2f}x "
              f"one), utilisation {util}, memory {memory} ({row['samples']} samples)", flush=True)

    print(f"\n3. checkpoints: {trial['checkpoint_mb_per_epoch']:.1f} MB per epoch written (weights when the metric "
          f"improves, everything every {settings.checkpoint_every} epochs and at the last), against "
          f"{trial['full_checkpoint_mb']:.1f} MB per epoch when everything is written every epoch")
    numbers = {"device": device_name(), "settings": settings.__dict__, "trial": trial, "bare": bare, "shared": shared}
    if args.segmentation:
        segmentation = timed_segmentation_trial(epochs=2 if args.quick else 3, size=512 if args.quick else 1024,
                                                views=8 if args.quick else 64, batch_size=4 if args.quick else 8)
        print(f"\n4. a U-Net trial (lung's trainer, autocast {segmentation['precision']}): "
              f"{segmentation['views_per_s']:.1f} training views/s, {segmentation['epoch_s']:.1f} s per epoch with "
              "stitched validation of whole fields", flush=True)
        numbers["segmentation"] = segmentation
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1, default=str))
    return numbers


if __name__ == "__main__":
    main()
