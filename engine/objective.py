"""The training loss of a run, built from its TrainConfig."""
from __future__ import annotations

import torch

from utils.config import TrainConfig
from utils.losses import dice_loss, grad_loss, one_hot, similarity_loss
from utils.spatial import warp


class Objective:
    """``sim_weight * sim(warp(moving, u), fixed) + reg_weight * Grad(u) + dice_weight * Dice``.

    The Dice term compares the moving label one-hot volumes, warped trilinearly, with the
    fixed ones over the data set's labels (background excluded).
    """

    def __init__(self, cfg: TrainConfig, labels):
        self.cfg, self.labels = cfg, list(labels)
        self.similarity = similarity_loss(cfg.similarity, cfg.ncc_window) if cfg.similarity != "none" else None

    @property
    def needs_labels(self) -> bool:
        return self.cfg.dice_weight > 0

    def __call__(self, moving, fixed, u, moving_label=None, fixed_label=None):
        """Returns (total loss, {term: float}) for displacement ``u`` (B, 3, D, H, W)."""
        c = self.cfg
        terms = {}
        total = u.new_zeros((), dtype=torch.float32)
        if self.similarity is not None:
            sim = self.similarity(warp(moving, u), fixed)
            terms["sim"] = sim
            total = total + c.sim_weight * sim
        reg = grad_loss(u, c.reg_penalty)
        terms["reg"] = reg
        total = total + c.reg_weight * reg
        if self.needs_labels:
            if moving_label is None or fixed_label is None:
                raise ValueError("the loss has a Dice term but the pair has no label maps")
            warped_oh = warp(one_hot(moving_label, self.labels), u)
            dice = dice_loss(warped_oh, one_hot(fixed_label, self.labels))
            terms["dice"] = dice
            total = total + c.dice_weight * dice
        terms["total"] = total
        return total, {k: float(v.detach()) for k, v in terms.items()}
