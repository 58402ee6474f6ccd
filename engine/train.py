"""Training: one loop for every data set, driven by a RunConfig.

Per epoch: the training items in a seeded order (two steps per item for atlas data),
validation Dice on held-out subjects, one row in ``train_log.csv``, and checkpoints
``last.pth`` (every epoch), ``best.pth`` (best validation Dice; the last epoch when
there is nothing to validate on) and the top-k ``dsc0.xxxx_ep0000.pth``, all written atomically with model, optimizer, epoch and config.
``resume=True`` continues from ``last.pth`` exactly where it stopped: the order of every
epoch depends only on (seed, epoch), so a resumed run equals an uninterrupted one.

Long runs: a non-finite loss skips its step (logged); ``train.max_bad_steps`` of them in a
row stop the run with TrainingDiverged, leaving the last good checkpoint. SIGTERM/SIGINT
finish the current step, write a resumable ``last.pth`` (with the position inside the
epoch) and raise TrainingInterrupted. Under ``torchrun`` each rank trains on its share of
every epoch with DistributedDataParallel; only rank 0 validates, logs and writes files.
"""
from __future__ import annotations

import csv
import json
import math
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import build_model, load_weights, read_weights
from models.backend import backend_name
from utils.checkpoint import CheckpointError, CheckpointKeeper, checkpoint_dict, read_checkpoint
from utils.config import RunConfig
from utils.datasets import DatasetIndex, VolumeCache, cache_capacity, discover
from utils.io import DataError
from utils.metrics import dice_per_label
from utils.spatial import warp_labels

from . import distributed as ddp
from .assembly import checkpoint_dir
from .evaluate import write_text
from .objective import Objective
from .resume_key import changes, describe, pair_files, resume_key, settings_of
from .runtime import amp_dtype, autocast, bar_disabled, package_versions, provenance, resolve_device, seed_everything

LOG_COLUMNS = ["epoch", "steps", "loss", "sim", "reg", "dice_loss", "val_dice", "skipped", "seconds", "elapsed",
               "lr", "resolution"]


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """A signal stopped the run after writing a resumable checkpoint."""

    def __init__(self, signum: int, path: Path):
        super().__init__(f"{signal.Signals(signum).name}: resumable checkpoint written to {path}; "
                         f"continue with --resume")
        self.signum, self.path = signum, path


def epoch_order(n_items: int, seed: int, epoch: int, limit: int = 0) -> list[int]:
    """The items of an epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n_items, generator=g).tolist()
    return order[:limit] if limit else order


@torch.inference_mode()
def validate(model, pairs, cache: VolumeCache, labels, device, interpolation: str = "nearest") -> float:
    """Mean over pairs of the mean label Dice after registration (NaN without labelled pairs)."""
    model.eval()
    scores = []
    for pair in pairs:
        t = cache.pair_tensors(pair, device)
        if "moving_label" not in t:
            continue
        u = model(t["moving"], t["fixed"])
        warped = warp_labels(t["moving_label"], u, interpolation, label_values=labels)
        d = dice_per_label(warped, t["fixed_label"], labels)
        if np.isfinite(d).any():
            scores.append(float(np.nanmean(d)))
    return float(np.mean(scores)) if scores else float("nan")


def half_resolution_batch(t: dict) -> dict:
    """Images average-pooled by 2 (odd sizes round up), label maps subsampled to the same grid."""
    out = {}
    for k, v in t.items():
        if k in ("moving", "fixed"):
            out[k] = F.avg_pool3d(v, 2, ceil_mode=True)
        elif k in ("moving_label", "fixed_label"):
            out[k] = v[:, :, ::2, ::2, ::2]
    return out


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if int(r["epoch"]) <= upto_epoch]


def _write_log(path: Path, rows: list[dict]) -> None:
    lines = [",".join(LOG_COLUMNS)] + [",".join(str(r.get(k, "")) for k in LOG_COLUMNS) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


class Trainer:
    """Holds the state of one training run; ``fit()`` runs the remaining epochs."""

    def __init__(self, run: RunConfig, *, resume: bool = False, overwrite: bool = False, init_from=None,
                 progress: bool | None = None, index: DatasetIndex | None = None):
        self.run, self.progress = run, progress
        tc = run.train
        self.ctx, self.device = ddp.setup(resolve_device(run.device))
        self.dir = checkpoint_dir(run)
        self.keeper = CheckpointKeeper(self.dir, tc.keep_top_k)
        if self.ctx.is_main:      # before any data is read: a busy or occupied folder stops the run at once
            self.keeper.open(resume=resume, overwrite=overwrite, log=lambda m: print(m, file=sys.stderr))
        try:
            self._setup(resume, init_from, index)
        except BaseException:
            self.keeper.close()
            raise

    def _setup(self, resume: bool, init_from, index: DatasetIndex | None) -> None:
        run, tc = self.run, self.run.train
        seed_everything(tc.seed + self.ctx.rank)
        self.index = index or discover(run.data, None, tc.seed)
        self.items = self.index.train_items()
        if not self.items:
            raise DataError(f"{run.data.root}: no training pairs")
        self.val_pairs = self.index.val_pairs() if self.ctx.is_main else []
        if tc.val_max_pairs:
            self.val_pairs = self.val_pairs[:tc.val_max_pairs]
        self.keeper.validated = bool(self.val_pairs)
        self.resume_key = resume_key("training", run, pair_files([p for item in self.items for p in item])
                                     + pair_files(self.index.val_pairs()))
        sides = {side for item in self.items for pair in item for side in (pair.moving, pair.fixed)}
        sides |= {side for pair in self.val_pairs for side in (pair.moving, pair.fixed)}
        self.cache = VolumeCache(run.data, capacity=cache_capacity(run.data, len(sides), run.data.cache_mb),
                                 workers=run.data.loader_workers)
        for pair in self.val_pairs:       # a bad validation subject stops the run now, not after an epoch
            self.cache.pair_tensors(pair)
        self.model = build_model(run.model).to(self.device)
        if init_from:       # our checkpoint, or the released code's (converted on the fly)
            load_weights(self.model, read_weights(init_from, run.model), str(init_from))
        self.objective = Objective(tc, run.data.labels)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=tc.lr, amsgrad=tc.amsgrad)
        self.amp = amp_dtype(self.device, tc.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.epoch, self.step = 0, 0
        self.position, self.partial = 0, {}          # inside an epoch interrupted by a signal
        self.bad_steps, self.skipped = 0, 0
        self.resolutions: set[str] = set()     # resolutions of the current epoch's steps
        self.started = time.time()
        self._signal: int | None = None
        if resume:
            self._resume()
        self.net = self.model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None)
        self.log = _read_log(self.dir / "train_log.csv", self.epoch) if self.ctx.is_main else []
        if self.ctx.is_main:
            write_text(self.dir / "config.json", json.dumps(
                {"run": run.to_dict(), **provenance(self.device), "world_size": self.ctx.world_size,
                 "kernels": backend_name(self.device, self.amp, training=True)}, indent=2))

    @property
    def best(self) -> float:
        """Best validation Dice so far (-inf before the first validation)."""
        return self.keeper.best

    def close(self) -> None:
        """Release the checkpoint folder (also done when ``fit`` returns and at exit)."""
        self.keeper.close()

    # -- checkpoints ---------------------------------------------------------
    def _state(self) -> dict:
        """The checkpoint: weights and config, plus everything ``--resume`` needs."""
        return checkpoint_dict(
            self.run.model.to_dict(), self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(), epoch=self.epoch, best_val_dice=self.keeper.best, step=self.step,
            top=self.keeper.top, position=self.position, partial=self.partial, run_config=self.run.to_dict(),
            torch_rng=torch.get_rng_state(), world_size=self.ctx.world_size, versions=package_versions(),
            resume_key=self.resume_key)

    def _resume(self) -> None:
        path = self.dir / "last.pth"
        ckpt = read_checkpoint(path)
        saved = ckpt.get("resume_key") or (          # a checkpoint of an older version: its settings only
            {"settings": settings_of(ckpt["run_config"], "training")} if ckpt.get("run_config") else None)
        changed = changes(saved, {k: v for k, v in self.resume_key.items() if k in saved}) if saved else []
        if changed:
            raise CheckpointError(f"{path}: the stopped run differs from this one in {describe(changed)}; resume "
                                  f"it with the same settings and data, or start again with --overwrite")
        load_weights(self.model, ckpt, str(path))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit this run ({exc})") from exc
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.keeper.restore(ckpt, log=lambda m: print(m, file=sys.stderr))
        self.step = int(ckpt.get("step", 0))
        self.position, self.partial = int(ckpt.get("position", 0)), dict(ckpt.get("partial", {}))
        if self.position and int(ckpt.get("world_size", 1)) != self.ctx.world_size:
            raise CheckpointError(f"{path}: stopped inside an epoch with {ckpt.get('world_size', 1)} process(es); "
                                  f"resume it with the same number (this run has {self.ctx.world_size})")
        if "torch_rng" in ckpt and not self.ctx.distributed:
            torch.set_rng_state(ckpt["torch_rng"])

    def _save(self, val_dice: float) -> None:
        """last.pth always; best.pth when validation improved; the top-k dsc files (rank 0 only)."""
        if self.ctx.is_main:
            self.keeper.save(self._state, val_dice, self.epoch)

    # -- steps ------------------------------------------------------------------
    def _batch(self, pairs) -> dict:
        """Tensors of one or more same-size pairs stacked along the batch axis."""
        ts = [self.cache.pair_tensors(p, self.device) for p in pairs]
        keys = [k for k in ("moving", "fixed", "moving_label", "fixed_label") if all(k in t for t in ts)]
        return {k: torch.cat([t[k] for t in ts]) for k in keys}

    def half_resolution(self) -> bool:
        """True while the run is in its half-resolution phase (``train.half_res_fraction``)."""
        tc = self.run.train
        if tc.half_res_fraction <= 0:
            return False
        if tc.max_minutes > 0:          # a wall-time phase: every rank follows rank 0's clock (a collective)
            return ddp.main_rank_decides(time.time() - self.started < 60.0 * tc.max_minutes * tc.half_res_fraction,
                                         self.ctx, self.device)
        return self.epoch < tc.epochs * tc.half_res_fraction

    def loss_of(self, t: dict):
        """(loss, terms) of a batch: the network under autocast, warping and losses in float32."""
        with autocast(self.device, self.amp):
            u = self.net(t["moving"], t["fixed"])
        return self.objective(t["moving"], t["fixed"], u.float(), t.get("moving_label"), t.get("fixed_label"))

    def train_step(self, pairs) -> dict | None:
        """One optimiser step on a list of pairs (a batch); None when a non-finite loss skipped it."""
        t = self._batch(pairs)
        half = self.half_resolution()
        self.resolutions.add("half" if half else "full")
        if half:
            t = half_resolution_batch(t)
        loss, terms = self.loss_of(t)
        tc = self.run.train
        if ddp.any_rank(not torch.isfinite(loss).item(), self.ctx, self.device):
            self.bad_steps += 1
            self.skipped += 1
            print(f"warning: non-finite loss at step {self.step + 1} (epoch {self.epoch + 1}); step skipped "
                  f"({self.bad_steps} in a row, stop at {tc.max_bad_steps})", file=sys.stderr, flush=True)
            if self.bad_steps >= tc.max_bad_steps:
                raise TrainingDiverged(
                    f"training stopped: {self.bad_steps} non-finite losses in a row (step {self.step + 1}, "
                    f"epoch {self.epoch + 1}); the last good checkpoint is {self.dir / 'last.pth'} "
                    f"(try a lower learning rate or --set train.warmup_steps=...)")
            return None
        self.bad_steps = 0
        for group in self.optimizer.param_groups:
            group["lr"] = tc.lr * min(1.0, (self.step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr
        self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms

    def out_of_time(self) -> bool:
        """True once ``train.max_minutes`` of wall time have passed since this trainer started."""
        limit = self.run.train.max_minutes
        return limit > 0 and time.time() - self.started > 60.0 * limit

    def _should_stop(self, steps: int) -> tuple[bool, bool]:
        """(signal received on any rank, out of time on rank 0): collectives, the same on every rank."""
        stop_signal = ddp.any_rank(self._signal is not None, self.ctx, self.device)
        late = ddp.main_rank_decides(self.out_of_time() and steps > 0, self.ctx, self.device)
        return stop_signal, late

    def _interrupted(self, sums, steps, seconds) -> None:
        """Write a resumable last.pth from inside the epoch and raise TrainingInterrupted."""
        self.partial = {"sums": dict(sums), "steps": steps, "seconds": seconds}
        path = self.dir / "last.pth"
        if self.ctx.is_main:
            self.keeper.save_last(self._state())
        ddp.barrier(self.ctx)
        raise TrainingInterrupted(self._signal or signal.SIGTERM, path)

    def run_epoch(self) -> dict:
        tc = self.run.train
        self.model.train()
        order = ddp.shard(epoch_order(len(self.items), tc.seed, self.epoch, tc.max_pairs), self.ctx)
        start, partial = self.position, self.partial
        sums = defaultdict(float, partial.get("sums", {}))
        steps, done_before = int(partial.get("steps", 0)), float(partial.get("seconds", 0.0))
        skipped_before, t0 = self.skipped, time.time()
        self.resolutions = set()              # of this epoch's steps; both when the phase ends inside it
        bar = tqdm(order[start:], desc=f"epoch {self.epoch + 1}/{tc.epochs}", leave=False,
                   disable=not self.ctx.is_main or bar_disabled(self.progress))
        upcoming = order[start:]
        for offset, i in enumerate(bar):
            if offset + 1 < len(upcoming):       # decode the next item while this one trains
                self.cache.prefetch([s for p in self.items[upcoming[offset + 1]] for s in (p.moving, p.fixed)])
            stop_signal, late = self._should_stop(steps)
            if stop_signal:
                self.position = start + offset
                self._interrupted(sums, steps, done_before + time.time() - t0)
            if late:
                break            # the time budget ends this epoch early (validated and saved as usual)
            batches = [self.items[i]] if self.run.train.pair_batch else [[p] for p in self.items[i]]
            for batch in batches:
                terms = self.train_step(batch)
                if terms is None:
                    continue
                steps += 1
                for k, v in terms.items():
                    sums[k] += v
                bar.set_postfix({k: f"{sums[k] / steps:.4f}" for k in ("total", "sim", "reg", "dice") if k in sums})
        self.position, self.partial = 0, {}
        means = ddp.mean_over_ranks({k: v / max(steps, 1) for k, v in sums.items()}, self.ctx, self.device)
        val = validate(self.model, self.val_pairs, self.cache, self.run.data.labels, self.device)
        self.epoch += 1
        seconds = done_before + time.time() - t0
        before = float(self.log[-1].get("elapsed") or 0) if self.log else 0.0
        row = {"epoch": self.epoch, "steps": steps, "loss": means.get("total", math.nan), "sim": means.get("sim", 0),
               "reg": means.get("reg", 0), "dice_loss": means.get("dice", 0), "val_dice": val,
               "skipped": self.skipped - skipped_before, "seconds": round(seconds, 3),
               "elapsed": round(before + seconds, 3), "lr": self.optimizer.param_groups[0]["lr"],
               "resolution": "+".join(r for r in ("half", "full") if r in self.resolutions)
               or ("half" if self.half_resolution() else "full")}
        if self.ctx.is_main:
            self.log.append(row)
            _write_log(self.dir / "train_log.csv", self.log)
        self._save(val)
        ddp.barrier(self.ctx)
        return row

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt       # a second Ctrl-C stops at once
        self._signal = signum
        if self.ctx.is_main:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step and writing a "
                  f"resumable checkpoint", file=sys.stderr, flush=True)

    def fit(self) -> list[dict]:
        """Run the remaining epochs (signals handled when called from the main thread)."""
        handle = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if handle else {}
        try:
            while self.epoch < self.run.train.epochs and not ddp.main_rank_decides(
                    self.out_of_time() and bool(self.log), self.ctx, self.device):
                row = self.run_epoch()
                if self.ctx.is_main:
                    print(f"epoch {row['epoch']}/{self.run.train.epochs}: loss {row['loss']:.4f}  "
                          f"val Dice {row['val_dice']:.4f}  ({row['seconds']:.1f} s)", flush=True)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.close()
        return self.log

    def weights_checksum(self) -> float:
        """Sum of all weights in float64: equal on every rank when DDP kept them in sync."""
        return float(sum(p.detach().double().sum() for p in self.model.state_dict().values()
                         if p.is_floating_point()))
