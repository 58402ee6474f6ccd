"""Registration pairs as dicts of tensors, loaded one at a time (``compare.py``, the benchmarks).

Each item is ``{"moving", "fixed"[, "moving_label", "fixed_label"], "name"}`` with (1, 1, D, H, W)
tensors; a method walks the list once, so nothing is kept in memory between items.
"""
from __future__ import annotations

import numpy as np
import torch

from utils.datasets import VolumeCache, discover, volume_tensor
from utils.io import DataError, load_volume

from .register import load_pair, read_pairs_csv


class LazyItems:
    """Pairs loaded one at a time (each method walks the list again)."""

    def __init__(self, names, load):
        self.names, self.load = list(names), load

    def __len__(self):
        return len(self.names)

    def __iter__(self):
        for i in range(len(self.names)):
            yield self.load(i)


def dataset_items(run, device):
    """(items, labels) of the data set's test pairs (``run.eval.max_pairs`` of them when set)."""
    pairs = discover(run.data, None, run.train.seed).test_pairs()
    if run.eval.max_pairs:
        pairs = pairs[:run.eval.max_pairs]
    if not pairs:
        raise DataError(f"{run.data.root}: no test pairs")
    cache = VolumeCache(run.data, capacity=4)

    def load(i):
        t = cache.pair_tensors(pairs[i], device)
        return {k: v for k, v in t.items() if isinstance(v, torch.Tensor)} | {"name": pairs[i].name}
    return LazyItems([p.name for p in pairs], load), list(run.data.labels)


def csv_items(path, run, device, max_pairs):
    """(items, labels) of a CSV of own pairs (``engine.register.read_pairs_csv``); the labels
    scored are those of the fixed label maps."""
    pairs = read_pairs_csv(path)[: max_pairs or None]

    def load(i):
        p = load_pair(pairs[i], run.data)
        return {k: volume_tensor(p[k], device) for k in ("moving", "fixed", "moving_label", "fixed_label") if k in p} \
            | {"name": pairs[i].case}
    labels = set()
    for files in pairs:
        if files.fixed_label:
            labels |= set(np.unique(load_volume(files.fixed_label, "label").array).tolist())
    return LazyItems([p.case for p in pairs], load), sorted(labels - {0})
