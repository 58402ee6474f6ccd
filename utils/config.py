"""Typed configuration: every hyperparameter of the network lives here.

Configs are dataclasses so that they can be saved beside (and inside) checkpoints
and rebuilt from them; ``to_dict``/``from_dict`` round-trip through plain JSON types.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .losses import SIMILARITIES


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class ModelConfig:
    """Architecture of PLCReg (README, "The network"). Defaults reproduce the OASIS network.

    Attributes:
        arch: the network's name in the model registry (``models/registry.py``): 'plcreg', or
            'voxelmorph' (the VoxelMorph baseline from the optional ``voxelmorph`` package:
            widths are its U-Net features, diffeomorphic its integration).
        in_channels: image channels of each input volume.
        widths: encoder widths of levels 1..5 (full, 1/2, 1/4, 1/8, 1/16 resolution).
        width_multiplier: scales every width (rounded, at least 1).
        window_size: PoLaCA window (D, H, W) in voxels of each attention level.
        num_heads: attention heads of PoLaCA (every attention level).
        alpha: ALS exponent range; p = 1 + alpha * sigmoid(theta) in (1, 1 + alpha).
        dwc_kernel: kernel of the depthwise convolution on the values.
        mlp_ratio: hidden width of the PoLaCA MLP relative to its width.
        attention_levels: levels (2..5) that use PoLaCA; level 1 never does.
        compose_levels: compose (instead of add) the upsampled coarse field and each residual.
        diffeomorphic: treat the output as a stationary velocity and integrate it.
        int_steps: scaling-and-squaring steps of the diffeomorphic option.
        released_compat: reproduce the authors' released network exactly, so that its weights
            (``scripts/convert_released.py``) give its fields: the values' depthwise-convolution
            output read in the released (token/head-mixing) layout, attention windows put back
            with the partition's permutation instead of its inverse, coarse fields upsampled as
            2 * interpolate(x2, align_corners=True), and the output field corrected so that our
            ``warp`` reproduces the released spatial transformer (README, "Differences from the
            released code"). Off by default.
        grad_checkpointing: recompute each level in the backward pass to save memory.
        freeze_encoder: encoder weights get no gradient (multi-task fine-tuning).
        freeze_upsampling: the estimator's transposed convolutions get no gradient either (with
            ``freeze_encoder``, the released code's fine-tuning).
    """
    arch: str = "plcreg"
    in_channels: int = 1
    widths: tuple = (16, 32, 64, 128, 256)
    width_multiplier: float = 1.0
    window_size: tuple = (5, 7, 6)
    num_heads: int = 8
    alpha: float = 15.0
    dwc_kernel: int = 3
    mlp_ratio: float = 4.0
    attention_levels: tuple = (2, 3, 4, 5)
    compose_levels: bool = False
    diffeomorphic: bool = False
    int_steps: int = 7
    released_compat: bool = False
    grad_checkpointing: bool = False
    freeze_encoder: bool = False
    freeze_upsampling: bool = False

    def __post_init__(self):
        self.widths = _tuple(self.widths)
        self.window_size = _tuple(self.window_size)
        self.attention_levels = _tuple(self.attention_levels)
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"ModelConfig.arch must be a registered model name, got {self.arch!r}")
        if len(self.widths) != 5:
            raise ValueError(f"ModelConfig.widths: expected 5 widths (levels 1..5), got {self.widths}")
        if len(self.window_size) != 3 or min(self.window_size) < 1:
            raise ValueError(f"ModelConfig.window_size: expected 3 positive integers (D, H, W), got {self.window_size}")
        if not set(self.attention_levels) <= {2, 3, 4, 5}:
            raise ValueError(f"ModelConfig.attention_levels: expected a subset of (2, 3, 4, 5), got {self.attention_levels}")
        if not self.width_multiplier > 0:
            raise ValueError(f"ModelConfig.width_multiplier must be > 0, got {self.width_multiplier}")
        if not (_finite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"ModelConfig.alpha (the ALS range): expected a finite number >= 0, got {self.alpha}")
        for level in self.attention_levels if self.arch == "plcreg" else ():
            w = self.level_widths[level - 1]
            if w % self.num_heads or (w // self.num_heads) % 2:
                raise ValueError(
                    f"ModelConfig: width {w} of attention level {level} must split into {self.num_heads} heads "
                    f"of even size (the values are halved between the two polarity streams)")

    @property
    def level_widths(self) -> tuple:
        """Widths of levels 1..5 after the multiplier."""
        return tuple(max(1, int(round(w * self.width_multiplier))) for w in self.widths)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
        return cls(**d)


def architecture_fields() -> tuple[str, ...]:
    """Fields of ModelConfig that change the weights' shapes or meaning (not run-time options)."""
    runtime = {"grad_checkpointing", "freeze_encoder", "freeze_upsampling"}
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in runtime)


# ---------------------------------------------------------------------------
# data, training and run configuration
# ---------------------------------------------------------------------------
LPBA40_LABELS = (21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50,
                 61, 62, 63, 64, 65, 66, 67, 68, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 101, 102, 121, 122,
                 161, 162, 163, 164, 165, 166)
IXI_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46, 47, 49, 50, 51, 52, 53,
              54, 60, 63)
SRREG_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 26, 28)


@dataclass
class DataConfig:
    """Where a data set lives on disk and how it is split, labelled and normalised.

    Attributes:
        name: data set name (used for folders such as Checkpoint/<name>).
        layout: on-disk layout, a reader of ``utils.datasets.LAYOUT_READERS`` (README, "Data sets").
        root: data set folder (``--data-root`` overrides).
        labels: label values scored by Dice/HD95 (background excluded).
        image_size: the data set's volume size (D, H, W), for reference and benchmarks.
        atlas_based: subjects are registered to (and from) one atlas; else pairs of subjects.
        normalisation: 'minmax' (to [0, 1]), 'ct' (clip to ``ct_window`` then [0, 1]),
            'percentile' (clip to the 0.5-99.5th percentiles then [0, 1]) or 'none'.
        fixed_normalisation: normalisation of the fixed image when it differs (CT->MR), else ''.
        ct_window: Hounsfield window for 'ct'.
        val_subjects: training subjects held out (seeded) for validation where the layout
            has no validation folder; model selection never looks at test pairs.
        n_train, n_test: subject counts of layouts split by sorted order (AbdomenCTCT, SR-Reg).
        atlas_label: file name of the atlas label map (OASIS, LPBA40).
        l2r_fixed_id: the atlas's Learn2Reg id (``0395`` or ``0395_0000``) for ``--l2r-out``
            file names when the atlas image's own name carries none; '' takes it from
            ``atlas_label`` where that name carries one.
        cache_mb: memory for decoded volumes during training (all of them when they fit).
        loader_workers: background threads that decode the next pairs while a step runs.
    """
    name: str = "OASIS"
    layout: str = "oasis"
    root: str = "../Datasets/OASIS"
    labels: tuple = tuple(range(1, 36))
    image_size: tuple = (160, 224, 192)
    atlas_based: bool = True
    normalisation: str = "minmax"
    fixed_normalisation: str = ""
    ct_window: tuple = (-1000.0, 1000.0)
    val_subjects: int = 3
    n_train: int = 0
    n_test: int = 0
    atlas_label: str = "OASIS_0395_0000.nii.gz"
    l2r_fixed_id: str = ""
    cache_mb: float = 4096.0        # decoded volumes kept in memory during training
    loader_workers: int = 1         # background threads decoding the next pairs (0 = none)

    def __post_init__(self):
        self.labels = tuple(int(v) for v in _tuple(self.labels))
        self.image_size = _tuple(self.image_size)
        self.ct_window = _tuple(self.ct_window)
        if not isinstance(self.layout, str) or not self.layout:
            raise ValueError(f"DataConfig.layout must name a data set reader, got {self.layout!r}")
        for norm in (self.normalisation, self.fixed_normalisation or "none"):
            if norm not in ("minmax", "ct", "percentile", "none"):
                raise ValueError(f"DataConfig: unknown normalisation {norm!r} (minmax, ct, percentile, none)")
        if 0 in self.labels:
            raise ValueError("DataConfig.labels: background (0) is never scored; leave it out")
        window = [float(v) for v in self.ct_window]
        if len(window) != 2 or not all(math.isfinite(v) for v in window) or window[0] >= window[1]:
            raise ValueError(f"data.ct_window {tuple(self.ct_window)}: expected two finite Hounsfield values, "
                             f"low < high, e.g. (-500, 800)")
        if not (_finite(self.cache_mb) and self.cache_mb >= 0):
            raise ValueError(f"DataConfig.cache_mb must be a finite number of MiB >= 0, got {self.cache_mb}")
        for name in ("loader_workers", "val_subjects", "n_train", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.layout == "abdomenctct" and self.val_subjects == 1:
            raise ValueError("DataConfig.val_subjects: validation pairs of the pairwise AbdomenCTCT layout "
                             "need 0 or at least 2 held-out subjects")


@dataclass
class TrainConfig:
    """Loss recipe, optimiser and schedule (defaults: the paper's mono-modal recipe).

    Loss = sim_weight * similarity(warped, fixed) + reg_weight * Grad-l2(u)
           + dice_weight * soft Dice(warped one-hot labels, fixed one-hot labels).
    """
    similarity: str = "ncc"          # a name of utils.losses.SIMILARITY_LOSSES ('ncc', 'mse', 'mind') or 'none'
    ncc_window: int = 9
    sim_weight: float = 1.0
    reg_weight: float = 1.0
    reg_penalty: str = "l2"
    dice_weight: float = 0.0
    lr: float = 4e-4
    warmup_steps: int = 0            # linear learning-rate warm-up over the first steps (0 = none)
    pair_batch: bool = False         # one step per item with its pairs as a batch (atlas: both directions)
    amsgrad: bool = True
    epochs: int = 50
    max_pairs: int = 0               # training items per epoch (0 = all)
    val_max_pairs: int = 0           # validation pairs per epoch (0 = all)
    keep_top_k: int = 3              # dsc0.xxxx_ep0000 checkpoints kept
    max_minutes: float = 0.0         # stop training after this wall time (0 = no limit)
    amp: bool = False                # mixed precision: bf16 (CPUs with native bf16, GPUs), else fp16 + grad scaler on GPUs
    max_bad_steps: int = 5           # non-finite losses in a row before the run stops
    half_res_fraction: float = 0.0   # first part of the run (of max_minutes, else of epochs) trained on
                                     # inputs average-pooled by 2: about 8x cheaper steps on a CPU
    seed: int = 0

    def __post_init__(self):
        if not (_finite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        for name in ("max_pairs", "val_max_pairs", "keep_top_k", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (_finite(self.max_minutes) and self.max_minutes >= 0):
            raise ValueError(f"TrainConfig.max_minutes must be a finite number >= 0 (0 = no limit), got {self.max_minutes}")
        if self.ncc_window < 1 or self.ncc_window % 2 == 0:
            raise ValueError(f"TrainConfig.ncc_window must be a positive odd integer, got {self.ncc_window}")
        for name in ("sim_weight", "reg_weight", "dice_weight"):
            if not (_finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.similarity not in (*SIMILARITIES, "none"):
            raise ValueError(f"TrainConfig.similarity must be one of {(*SIMILARITIES, 'none')}, got {self.similarity!r}")
        if self.max_bad_steps < 1:
            raise ValueError(f"TrainConfig.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if not 0.0 <= self.half_res_fraction <= 1.0:
            raise ValueError(f"TrainConfig.half_res_fraction must be in [0, 1], got {self.half_res_fraction}")
        if self.similarity == "none" and self.dice_weight <= 0:
            raise ValueError("TrainConfig: with similarity 'none' the loss needs dice_weight > 0")


@dataclass
class EvalConfig:
    """Inference options."""
    label_interpolation: str = "nearest"   # 'nearest' or 'onehot'
    hd95_spacing: bool = False             # HD95 in mm (image spacing) instead of voxels
    max_pairs: int = 0                     # test pairs evaluated (0 = all)
    amp: bool = False                      # mixed precision for the network (bf16 on native-bf16 CPUs; fields fp32)
    compile: bool = False                  # torch.compile the network (fixed shapes; compiles on the first pair)
    background: bool = True                # read the next pair and write results in background threads
    # instance optimisation (engine/instance_opt.py): refine each pair's field on its own
    # unsupervised loss (the run's similarity; MIND when training used labels only)
    io_steps: int = 0                      # Adam steps per pair (0 = the network's field as it is)
    io_lr: float = 2.0                     # voxels of the optimisation grid per step
    io_weight: float = 5.0                 # weight of the Grad-l2 smoothness term
    io_scale: int = 2                      # optimise on a grid this many times coarser
    io_fine_steps: int = 12                # then this many steps at full resolution (coarse to fine)
    io_fine_lr: float = 0.5                # their step size (voxels)
    io_fine_weight: float = 3.0            # their smoothness weight
    io_fine_smoothing: int = 1             # their 3x3x3 mean filters
    io_smoothing: int = 3                  # 3x3x3 mean filters applied to the correction
    io_ncc_window: int = 5                 # NCC window on the optimisation grid

    def __post_init__(self):
        if self.label_interpolation not in ("nearest", "onehot"):
            raise ValueError(f"EvalConfig.label_interpolation must be nearest or onehot, got {self.label_interpolation!r}")
        if self.io_fine_steps < 0 or not (_finite(self.io_fine_lr) and self.io_fine_lr > 0) \
                or not (_finite(self.io_fine_weight) and self.io_fine_weight >= 0) or self.io_fine_smoothing < 0:
            raise ValueError("EvalConfig: expected io_fine_steps >= 0, io_fine_lr > 0, io_fine_weight >= 0, "
                             f"io_fine_smoothing >= 0; got {self.io_fine_steps}, {self.io_fine_lr}, "
                             f"{self.io_fine_weight}, {self.io_fine_smoothing}")
        if self.io_steps < 0 or not (_finite(self.io_lr) and self.io_lr > 0) \
                or not (_finite(self.io_weight) and self.io_weight >= 0) or self.io_scale < 1 or self.io_smoothing < 0:
            raise ValueError("EvalConfig: expected io_steps >= 0, io_lr > 0, io_weight >= 0, io_scale >= 1, "
                             f"io_smoothing >= 0; got {self.io_steps}, {self.io_lr}, {self.io_weight}, "
                             f"{self.io_scale}, {self.io_smoothing}")
        if self.max_pairs < 0:
            raise ValueError(f"EvalConfig.max_pairs must be >= 0 (0 = all), got {self.max_pairs}")
        if self.io_ncc_window < 1 or self.io_ncc_window % 2 == 0:
            raise ValueError(f"EvalConfig.io_ncc_window must be a positive odd integer, got {self.io_ncc_window}")


@dataclass
class RunConfig:
    """Everything one training or inference run needs; saved beside and inside checkpoints."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"                   # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'
    checkpoint_dir: str = ""               # default Checkpoint/<data.name>
    output_dir: str = ""                   # default Results/<data.name>

    def validate(self) -> "RunConfig":
        """Check every section again (after fields were set directly) and the device name;
        ValueError naming the setting otherwise."""
        for section in (self.data, self.model, self.train, self.eval):
            section.__post_init__()
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise ValueError(f"device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"data": _plain(self.data), "model": self.model.to_dict(), "train": _plain(self.train),
                "eval": _plain(self.eval), "device": self.device, "checkpoint_dir": self.checkpoint_dir,
                "output_dir": self.output_dir}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(data=DataConfig(**d["data"]), model=ModelConfig.from_dict(d["model"]),
                   train=TrainConfig(**d["train"]), eval=EvalConfig(**d.get("eval", {})),
                   device=d.get("device", "auto"), checkpoint_dir=d.get("checkpoint_dir", ""),
                   output_dir=d.get("output_dir", ""))


def _finite(value) -> bool:
    """A real number that is neither NaN nor infinite (settings compared with < or > alone let NaN through)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _plain(obj) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


# ---------------------------------------------------------------------------
# per-data-set presets (README, "Data sets"; the paper's recipe per data set)
# ---------------------------------------------------------------------------
def oasis() -> RunConfig:
    return RunConfig(data=DataConfig(), model=ModelConfig(window_size=(5, 7, 6)))


def lpba40() -> RunConfig:
    return RunConfig(
        data=DataConfig(name="LPBA40", layout="lpba40", root="../Datasets/LPBA40_delineation",
                        labels=LPBA40_LABELS, image_size=(160, 192, 160),
                        atlas_label="S01.delineation.structure.label.nii.gz"),
        model=ModelConfig(window_size=(5, 6, 5)))


def ixi() -> RunConfig:
    return RunConfig(
        data=DataConfig(name="IXI", layout="ixi", root="../Datasets/IXI_data", labels=IXI_LABELS,
                        image_size=(160, 192, 224), normalisation="none", atlas_label=""),
        model=ModelConfig(window_size=(5, 6, 7)))


def abdomenctct() -> RunConfig:
    return RunConfig(
        data=DataConfig(name="AbdomenCTCT", layout="abdomenctct", root="../Datasets/AbdomenCTCT",
                        labels=tuple(range(1, 14)), image_size=(192, 160, 256), atlas_based=False,
                        normalisation="ct", ct_window=(-500.0, 800.0), val_subjects=2, n_train=20, n_test=10,
                        atlas_label=""),
        model=ModelConfig(window_size=(6, 5, 8)))


def srreg() -> RunConfig:
    return RunConfig(
        data=DataConfig(name="SRReg", layout="srreg", root="../Datasets/SR-REG", labels=SRREG_LABELS,
                        image_size=(176, 208, 192), atlas_based=False, normalisation="ct",
                        fixed_normalisation="percentile", ct_window=(-1000.0, 2000.0), val_subjects=5,
                        n_train=150, n_test=0, atlas_label=""),
        model=ModelConfig(window_size=(8, 8, 6)),
        train=TrainConfig(similarity="none", dice_weight=1.0, reg_weight=0.1))


def demo() -> RunConfig:
    """The embedded demo data (``python demo.py`` builds it) with the lighter CPU network."""
    return RunConfig(
        data=DataConfig(name="Demo", layout="oasis", root="data/demo_dataset", labels=tuple(range(1, 21)),
                        image_size=(80, 96, 80), val_subjects=2),
        model=ModelConfig(widths=(8, 16, 32, 64, 128), window_size=(5, 6, 5)),
        train=TrainConfig(warmup_steps=30, pair_batch=True, half_res_fraction=0.6, keep_top_k=1))


PRESETS = {"OASIS": oasis, "LPBA40": lpba40, "IXI": ixi, "AbdomenCTCT": abdomenctct, "SRReg": srreg, "Demo": demo}


def preset(name: str) -> RunConfig:
    """The default RunConfig of a data set (one of PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def apply_override(run: RunConfig, assignment: str) -> None:
    """Apply ``section.field=value`` (e.g. ``train.lr=1e-4``, ``model.window_size=5,6,5``)."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r}: expected section.field=value")
    key, text = assignment.split("=", 1)
    section, _, name = key.strip().partition(".")
    target = run if not name else getattr(run, section, None)
    name = name or section
    if target is None or not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
        raise ValueError(f"override {assignment!r}: unknown setting {key!r}")
    current = getattr(target, name)
    setattr(target, name, _parse_like(current, text.strip(), key))
    if hasattr(target, "__post_init__"):
        target.__post_init__()


def _parse_like(current, text: str, key: str):
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            items = [t for t in text.replace("x", ",").split(",") if t.strip()] if text else []
            kind = type(current[0]) if current else float
            return tuple(kind(t) for t in items)
        return text
    except ValueError as exc:
        raise ValueError(f"override {key}={text!r}: cannot read a {type(current).__name__}") from exc


__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "EvalConfig", "RunConfig", "PRESETS", "preset",
           "apply_override", "architecture_fields"]
