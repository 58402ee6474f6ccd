"""Training: one loop for every data set, driven by a RunConfig.

Per epoch: the training items in a seeded order (two steps per item for atlas data),
validation Dice on held-out subjects, one row in ``train_log.csv``, and checkpoints
``last.pth`` (every epoch), ``best.pth`` (best validation Dice; the last epoch when
there is nothing to validate on) and the top-k ``dsc0.xxxx_ep0000.pth``, all written atomically with model, optimizer, epoch and config.
``resume=True`` continues from ``last.pth`` exactly where it stopped: the order of every
epoch depends only on (seed, epoch), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import build_model, load_weights
from utils.checkpoint import FORMAT, CheckpointError, atomic_save, read_checkpoint
from utils.config import RunConfig
from utils.datasets import DatasetIndex, VolumeCache, discover
from utils.io import DataError
from utils.metrics import dice_per_label
from utils.spatial import warp_labels

from .evaluate import write_text
from .objective import Objective
from .runtime import command_line, package_versions, resolve_device, seed_everything

LOG_COLUMNS = ["epoch", "steps", "loss", "sim", "reg", "dice_loss", "val_dice", "seconds", "lr"]


def checkpoint_dir(run: RunConfig) -> Path:
    return Path(run.checkpoint_dir or f"Checkpoint/{run.data.name}")


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

    def __init__(self, run: RunConfig, *, data_root=None, resume: bool = False, init_from=None,
                 progress: bool | None = None, index: DatasetIndex | None = None):
        self.run, self.progress = run, progress
        self.device = resolve_device(run.device)
        tc = run.train
        seed_everything(tc.seed)
        self.index = index or discover(run.data, data_root, tc.seed)
        self.items = self.index.train_items()
        if not self.items:
            raise DataError(f"{run.data.root}: no training pairs")
        self.val_pairs = self.index.val_pairs()
        if tc.val_max_pairs:
            self.val_pairs = self.val_pairs[:tc.val_max_pairs]
        self.cache = VolumeCache(run.data, capacity=max(16, len(self.val_pairs) + 4))
        self.dir = checkpoint_dir(run)
        self.model = build_model(run.model).to(self.device)
        if init_from:
            load_weights(self.model, read_checkpoint(init_from), str(init_from))
            self.model.freeze_encoder(run.model.freeze_encoder)
        self.objective = Objective(tc, run.data.labels)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=tc.lr, amsgrad=tc.amsgrad)
        self.epoch, self.best, self.top, self.step = 0, -math.inf, [], 0
        self.started = time.time()
        if resume:
            self._resume()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = _read_log(self.dir / "train_log.csv", self.epoch)
        write_text(self.dir / "config.json", json.dumps(
            {"run": run.to_dict(), "command": command_line(), "versions": package_versions()}, indent=2))

    # -- checkpoints ---------------------------------------------------------
    def _state(self) -> dict:
        return {"format": FORMAT, "model_config": self.run.model.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "best_val_dice": self.best,
                "step": self.step, "top": self.top, "run_config": self.run.to_dict(), "torch_rng": torch.get_rng_state(),
                "versions": package_versions()}

    def _resume(self) -> None:
        path = self.dir / "last.pth"
        ckpt = read_checkpoint(path)
        load_weights(self.model, ckpt, str(path))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit this run ({exc})") from exc
        self.epoch, self.best = int(ckpt["epoch"]), float(ckpt.get("best_val_dice", -math.inf))
        self.top = [tuple(t) for t in ckpt.get("top", [])]
        self.step = int(ckpt.get("step", 0))
        if "torch_rng" in ckpt:
            torch.set_rng_state(ckpt["torch_rng"])

    def _save(self, val_dice: float) -> None:
        """last.pth always; best.pth when validation improved; the top-k dsc files."""
        improved = (math.isfinite(val_dice) and val_dice > self.best) or not self.val_pairs
        if improved:
            self.best = val_dice
        name, dropped = None, []
        k = self.run.train.keep_top_k
        if k > 0 and math.isfinite(val_dice):
            name = f"dsc{val_dice:.4f}_ep{self.epoch:04d}.pth"
            ranked = sorted(self.top + [(val_dice, name)], key=lambda t: -t[0])
            self.top, dropped = ranked[:k], [n for _, n in ranked[k:]]
        state = self._state()
        atomic_save(state, self.dir / "last.pth")
        if improved:
            atomic_save(state, self.dir / "best.pth")
        if name is not None and name not in dropped:
            atomic_save(state, self.dir / name)
        for old in dropped:
            (self.dir / old).unlink(missing_ok=True)

    # -- steps ------------------------------------------------------------------
    def _batch(self, pairs) -> dict:
        """Tensors of one or more same-size pairs stacked along the batch axis."""
        ts = [self.cache.pair_tensors(p, self.device) for p in pairs]
        keys = [k for k in ("moving", "fixed", "moving_label", "fixed_label") if all(k in t for t in ts)]
        return {k: torch.cat([t[k] for t in ts]) for k in keys}

    def train_step(self, pairs) -> dict:
        """One optimiser step on a list of pairs (a batch)."""
        t = self._batch(pairs)
        u = self.model(t["moving"], t["fixed"])
        loss, terms = self.objective(t["moving"], t["fixed"], u, t.get("moving_label"), t.get("fixed_label"))
        tc = self.run.train
        for group in self.optimizer.param_groups:
            group["lr"] = tc.lr * min(1.0, (self.step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr
        self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return terms

    def out_of_time(self) -> bool:
        """True once ``train.max_minutes`` of wall time have passed since this trainer started."""
        limit = self.run.train.max_minutes
        return limit > 0 and time.time() - self.started > 60.0 * limit

    def run_epoch(self) -> dict:
        tc = self.run.train
        self.model.train()
        order = epoch_order(len(self.items), tc.seed, self.epoch, tc.max_pairs)
        sums, steps, t0 = defaultdict(float), 0, time.time()
        bar = tqdm(order, desc=f"epoch {self.epoch + 1}/{tc.epochs}", leave=False,
                   disable=None if self.progress is None else not self.progress)
        for i in bar:
            if self.out_of_time() and steps:
                break            # the time budget ends this epoch early (validated and saved as usual)
            batches = [self.items[i]] if self.run.train.pair_batch else [[p] for p in self.items[i]]
            for batch in batches:
                terms = self.train_step(batch)
                steps += 1
                for k, v in terms.items():
                    sums[k] += v
                bar.set_postfix({k: f"{sums[k] / steps:.4f}" for k in ("total", "sim", "reg", "dice") if k in sums})
        val = validate(self.model, self.val_pairs, self.cache, self.run.data.labels, self.device)
        self.epoch += 1
        row = {"epoch": self.epoch, "steps": steps, "loss": sums["total"] / steps, "sim": sums.get("sim", 0) / steps,
               "reg": sums["reg"] / steps, "dice_loss": sums.get("dice", 0) / steps, "val_dice": val,
               "seconds": round(time.time() - t0, 3), "lr": self.optimizer.param_groups[0]["lr"]}
        self.log.append(row)
        _write_log(self.dir / "train_log.csv", self.log)
        self._save(val)
        return row

    def fit(self) -> list[dict]:
        while self.epoch < self.run.train.epochs and not (self.out_of_time() and self.log):
            row = self.run_epoch()
            print(f"epoch {row['epoch']}/{self.run.train.epochs}: loss {row['loss']:.4f}  "
                  f"val Dice {row['val_dice']:.4f}  ({row['seconds']:.1f} s)", flush=True)
        return self.log
