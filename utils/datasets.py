"""Data sets as they lie on disk: discovery, splits, pairs, loading and normalisation.

Each layout has one small function that lists its subjects and splits
(``LAYOUT_READERS``); pairing, loading, normalisation and caching are shared.

Pairs
-----
* atlas-based (OASIS, LPBA40, IXI): a training item is one subject and gives two
  steps, atlas -> subject then subject -> atlas; validation and test pairs are
  subject -> atlas (moving subject, fixed atlas), as in the paper.
* AbdomenCTCT: every ordered pair of distinct subjects within a split.
* SR-Reg: within each subject, CT (moving) -> MR (fixed); one segmentation for both.
"""
from __future__ import annotations

import itertools
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .io import DataError, Volume, check_same_grid, load_volume, image_stem, load_pickle_pair, require_file


@dataclass(frozen=True)
class Side:
    """One side of a pair: an image file and its label map file (same file for pickles)."""
    name: str
    image: str
    label: str | None
    fmt: str = "nifti"               # 'nifti' or 'pickle'
    role: str = "moving"             # normalised as a moving ('moving') or fixed-modality ('fixed') image


@dataclass(frozen=True)
class Pair:
    moving: Side
    fixed: Side

    @property
    def name(self) -> str:
        return f"{self.moving.name}_to_{self.fixed.name}"


@dataclass
class DatasetIndex:
    """Subjects of a data set by split, and the pairs built from them."""
    config: DataConfig
    train: list[Side]
    val: list[Side]
    test: list[Side]
    atlas: Side | None = None
    partner: dict[str, Side] = field(default_factory=dict)   # SR-Reg: CT subject -> its MR side

    def _pairs_of(self, subjects: list[Side]) -> list[Pair]:
        if self.atlas is not None:
            return [Pair(s, self.atlas) for s in subjects]
        if self.partner:
            return [Pair(s, self.partner[s.name]) for s in subjects]
        return [Pair(a, b) for a, b in itertools.permutations(subjects, 2)]

    def train_items(self) -> list[list[Pair]]:
        """Training items; each is the list of steps taken for it (two for atlas data)."""
        if self.atlas is not None:
            return [[Pair(self.atlas, s), Pair(s, self.atlas)] for s in self.train]
        return [[p] for p in self._pairs_of(self.train)]

    def val_pairs(self) -> list[Pair]:
        return self._pairs_of(self.val)

    def test_pairs(self) -> list[Pair]:
        return self._pairs_of(self.test)


# ---------------------------------------------------------------------------
# discovery per layout
# ---------------------------------------------------------------------------
def natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def _require_file(path: Path, what: str) -> Path:
    return require_file(path, what)


def _files(folder: Path, pattern: str, what: str) -> list[Path]:
    _require_dir(folder, what)
    files = sorted(folder.glob(pattern), key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"{folder}: no {pattern} files in the {what} folder")
    return files


def _holdout(train: list[Side], n: int, seed: int) -> tuple[list[Side], list[Side]]:
    """Hold ``n`` training subjects out for validation (seeded; never all of them)."""
    n = min(n, max(len(train) - 1, 0))
    if n <= 0:
        return train, []
    rng = np.random.default_rng(seed)
    pick = set(rng.choice(len(train), size=n, replace=False).tolist())
    return [s for i, s in enumerate(train) if i not in pick], [s for i, s in enumerate(train) if i in pick]


def read_oasis(cfg: DataConfig, root: Path, seed: int) -> DatasetIndex:
    """OASIS (and the demo data set), atlas-based::

        <root>/fixed.nii.gz                         the atlas image
        <root>/Train/OASIS_0001_0000.nii.gz ...     training subjects
        <root>/Test/OASIS_0400_0000.nii.gz ...      test subjects
        <root>/label/<same file names>              their label maps; the atlas's is
                                                    label/<cfg.atlas_label> (OASIS_0395_0000.nii.gz)

    Subjects are named by the first 10 characters of the file name; ``cfg.val_subjects``
    training subjects are held out (seeded) for validation.
    """
    label_dir = _require_dir(root / "label", "label")

    def side(img: Path) -> Side:
        return Side(image_stem(img)[:10], str(img), str(_require_file(label_dir / img.name, f"label of {img}")))

    atlas_img = _require_file(root / "fixed.nii.gz", "atlas image")
    atlas_lab = label_dir / cfg.atlas_label if cfg.atlas_label else label_dir / "fixed.nii.gz"
    atlas = Side("atlas", str(atlas_img), str(_require_file(atlas_lab, "atlas label")))
    train = [side(p) for p in _files(root / "Train", "*.nii.gz", "Train")]
    test = [side(p) for p in _files(root / "Test", "*.nii.gz", "Test")]
    train, val = _holdout(train, cfg.val_subjects, seed)
    return DatasetIndex(cfg, train, val, test, atlas)


def read_lpba40(cfg: DataConfig, root: Path, seed: int) -> DatasetIndex:
    """LPBA40, atlas-based (atlas S01)::

        <root>/delineation_l_norm/fixed.nii.gz                             the atlas image
        <root>/delineation_l_norm/train/S11.delineation.skullstripped.nii.gz ...
        <root>/delineation_l_norm/test/S02.delineation.skullstripped.nii.gz ...
        <root>/label/S01.delineation.structure.label.nii.gz ...            label maps by subject id

    The subject id is the file name up to its first dot; ``cfg.val_subjects`` training
    subjects are held out (seeded).
    """
    img_dir = _require_dir(root / "delineation_l_norm", "delineation_l_norm")
    label_dir = _require_dir(root / "label", "label")

    def side(img: Path) -> Side:
        sid = img.name.split(".")[0]
        lab = label_dir / f"{sid}.delineation.structure.label.nii.gz"
        return Side(sid, str(img), str(_require_file(lab, f"label of {img}")))

    atlas = Side("atlas", str(_require_file(img_dir / "fixed.nii.gz", "atlas image")),
                 str(_require_file(label_dir / cfg.atlas_label, "atlas label")))
    train = [side(p) for p in _files(img_dir / "train", "*.nii.gz", "train")]
    test = [side(p) for p in _files(img_dir / "test", "*.nii.gz", "test")]
    train, val = _holdout(train, cfg.val_subjects, seed)
    return DatasetIndex(cfg, train, val, test, atlas)


def read_ixi(cfg: DataConfig, root: Path, seed: int) -> DatasetIndex:
    """IXI (the TransMorph release), atlas-based::

        <root>/atlas.pkl                      the atlas
        <root>/Train/subject_0.pkl ...        training subjects
        <root>/Val/...                        validation subjects (optional: else held out)
        <root>/Test/...                       test subjects

    Each pickle holds ``(image, label)`` numpy arrays, read by a restricted unpickler
    (``utils.io.load_pickle_pair``) with an identity affine.
    """
    def sides(folder: str) -> list[Side]:
        return [Side(image_stem(p), str(p), str(p), "pickle") for p in _files(root / folder, "*.pkl", folder)]

    atlas_path = _require_file(root / "atlas.pkl", "atlas")
    atlas = Side("atlas", str(atlas_path), str(atlas_path), "pickle")
    val = sides("Val") if (root / "Val").is_dir() else []
    train = sides("Train")
    if not val:
        train, val = _holdout(train, cfg.val_subjects, seed)
    return DatasetIndex(cfg, train, val, sides("Test"), atlas)


def read_abdomenctct(cfg: DataConfig, root: Path, seed: int) -> DatasetIndex:
    """AbdomenCTCT (Learn2Reg), pairs of subjects::

        <root>/imagesTr/AbdomenCTCT_0001_0000.nii.gz ...   CT images
        <root>/labelsTr/<same file names>                   their label maps
        <root>/imagesTs/..., labelsTs/...                   used when labelled

    The labelled subjects, sorted, give ``cfg.n_train`` training then ``cfg.n_test`` test
    subjects; pairs are every ordered pair within a split.
    """
    labelled = []
    for img_dir, lab_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if img_dir == "imagesTs" and not (root / lab_dir).is_dir():
            continue
        labels = _require_dir(root / lab_dir, lab_dir)
        for p in _files(root / img_dir, "*.nii.gz", img_dir):
            lab = labels / p.name
            if lab.is_file():
                labelled.append(Side(image_stem(p)[:16], str(p), str(lab)))
    need = cfg.n_train + cfg.n_test
    if len(labelled) < need:
        raise DataError(f"{root}: {len(labelled)} labelled subjects found, the split needs {need} "
                        f"({cfg.n_train} train + {cfg.n_test} test)")
    train, test = labelled[:cfg.n_train], labelled[cfg.n_train:need]
    train, val = _holdout(train, cfg.val_subjects, seed)
    return DatasetIndex(cfg, train, val, test)


def read_srreg(cfg: DataConfig, root: Path, seed: int) -> DatasetIndex:
    """SR-Reg, CT (moving) to MR (fixed) of the same subject::

        <root>/vol/1BA001_ct.nii.gz, vol/1BA001_mr.nii.gz ...   the two images of each subject
        <root>/seg/1BA001.nii.gz ...                             one segmentation for both

    The first ``cfg.n_train`` subjects (sorted) train, the rest (or the next ``cfg.n_test``)
    test; the MR is normalised as the fixed modality (``cfg.fixed_normalisation``).
    """
    vol_dir = _require_dir(root / "vol", "vol")
    seg_dir = _require_dir(root / "seg", "seg")
    subjects, partner = [], {}
    for ct in _files(vol_dir, "*_ct.nii.gz", "vol"):
        sid = ct.name[: -len("_ct.nii.gz")]
        seg = str(_require_file(seg_dir / f"{sid}.nii.gz", f"segmentation of {sid}"))
        mr = str(_require_file(vol_dir / f"{sid}_mr.nii.gz", f"MR of {sid}"))
        subjects.append(Side(sid, str(ct), seg))
        partner[sid] = Side(f"{sid}_mr", mr, seg, role="fixed")
    n_train = min(cfg.n_train, len(subjects) - 1)
    train = subjects[:n_train]
    test = subjects[n_train:] if cfg.n_test <= 0 else subjects[n_train:n_train + cfg.n_test]
    if not test:
        raise DataError(f"{root}: no test subjects left after the first {n_train} for training")
    train, val = _holdout(train, cfg.val_subjects, seed)
    return DatasetIndex(cfg, train, val, test, partner=partner)


# the one place a new data set layout is added: its reader above, one entry here, and a preset
# in utils/config.py (README, "Adding a data set")
LAYOUT_READERS = {"oasis": read_oasis, "lpba40": read_lpba40, "ixi": read_ixi,
                  "abdomenctct": read_abdomenctct, "srreg": read_srreg}


def discover(cfg: DataConfig, root: str | Path | None = None, seed: int = 0) -> DatasetIndex:
    """List a data set's subjects and splits from its folder (``cfg.root`` unless ``root``)."""
    check_layout(cfg.layout)
    root = Path(root or cfg.root)
    _require_dir(root, f"{cfg.name} data set")
    return LAYOUT_READERS[cfg.layout](cfg, root, seed)


def check_layout(layout: str) -> None:
    """ValueError unless ``layout`` names a reader of LAYOUT_READERS."""
    if layout not in LAYOUT_READERS:
        raise ValueError(f"data.layout must be one of {sorted(LAYOUT_READERS)}, got {layout!r}")


# ---------------------------------------------------------------------------
# loading and normalisation
# ---------------------------------------------------------------------------
def normalise(image: np.ndarray, method: str, ct_window=(-1000.0, 1000.0)) -> np.ndarray:
    """Intensity normalisation to [0, 1] (float32).

    'minmax': (x - min) / (max - min); 'ct': clip to the Hounsfield window, then to [0, 1];
    'percentile': clip to the 0.5 and 99.5th percentiles, then min-max; 'none': unchanged.
    """
    x = image.astype(np.float32, copy=False)
    if method == "none":
        return x
    if method == "ct":
        lo, hi = ct_window
    elif method == "percentile":
        lo, hi = np.percentile(x, [0.5, 99.5])
    elif method == "minmax":
        lo, hi = float(x.min()), float(x.max())
    else:
        raise ValueError(f"unknown normalisation {method!r}")
    if hi <= lo:
        return np.zeros_like(x)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


@dataclass
class LoadedSide:
    image: Volume          # normalised intensities, geometry of the file
    label: Volume | None


class VolumeCache:
    """Reads sides once and keeps the last ``capacity`` of them (the atlas stays hot).

    With ``workers`` > 0, ``prefetch(sides)`` decodes sides in background threads while the
    caller computes (NIfTI decompression releases the GIL); ``get`` then takes the result.
    Thread-safe.
    """

    def __init__(self, cfg: DataConfig, capacity: int = 16, workers: int = 0):
        self.cfg, self.capacity = cfg, max(1, capacity)
        self._items: "OrderedDict[Side, LoadedSide]" = OrderedDict()
        self._pending: dict[Side, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prefetch") if workers > 0 else None
        self.reads = 0                      # sides decoded so far (each at most once while cached)

    def _read(self, side: Side) -> LoadedSide:
        self.reads += 1
        if side.fmt == "pickle":
            image, label = load_pickle_pair(side.image)
        else:
            image = load_volume(side.image, "image")
            label = load_volume(side.label, "label") if side.label else None
            if label is not None:
                check_same_grid(image, label)
        if label is not None and self.cfg.labels and not np.isin(self.cfg.labels, label.array).any():
            raise DataError(f"{label.path}: none of the data set's labels {_short(self.cfg.labels)} occur in this "
                            f"label map (it holds {_short(np.unique(label.array)[1:].tolist())}); set "
                            f"data.labels to the values your label maps use")
        method = self.cfg.fixed_normalisation if side.role == "fixed" and self.cfg.fixed_normalisation \
            else self.cfg.normalisation
        image.array = normalise(image.array, method, self.cfg.ct_window)
        return LoadedSide(image, label)

    def prefetch(self, sides) -> None:
        """Start decoding sides that are neither cached nor on their way (no-op without workers)."""
        if self._pool is None:
            return
        with self._lock:
            for side in sides:
                if side not in self._items and side not in self._pending:
                    self._pending[side] = self._pool.submit(self._read, side)

    def get(self, side: Side) -> LoadedSide:
        with self._lock:
            item = self._items.get(side)
            if item is not None:
                self._items.move_to_end(side)
                return item
            future = self._pending.pop(side, None)
        item = future.result() if future is not None else self._read(side)   # errors surface here
        with self._lock:
            self._items[side] = item
            self._items.move_to_end(side)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item

    def pair_tensors(self, pair: Pair, device="cpu") -> dict:
        """(1, 1, D, H, W) tensors of a pair: moving, fixed, and labels where present."""
        m, f = self.get(pair.moving), self.get(pair.fixed)
        if m.image.array.shape != f.image.array.shape:
            raise DataError(f"shape mismatch: {m.image.path} is {m.image.array.shape} but "
                            f"{f.image.path} is {f.image.array.shape}; resample to a common grid first")
        out = {"moving": volume_tensor(m.image.array, device), "fixed": volume_tensor(f.image.array, device),
               "fixed_volume": f.image, "moving_volume": m.image}
        if m.label is not None and f.label is not None:
            out["moving_label"] = volume_tensor(m.label.array, device)
            out["fixed_label"] = volume_tensor(f.label.array, device)
        return out


def _short(values, n: int = 8) -> str:
    values = list(values)
    return str(values) if len(values) <= n else f"[{', '.join(map(str, values[:n]))}, ... ({len(values)} values)]"


def cache_capacity(cfg: DataConfig, n_sides: int, budget_mb: float) -> int:
    """How many sides to keep: all of them when they fit in ``budget_mb`` (image + label at the
    data set's image size), else as many as fit, at least 16."""
    per_side = 8.0 * float(np.prod(cfg.image_size)) / 2 ** 20
    return max(16, min(n_sides, int(budget_mb // max(per_side, 1e-6))))


def volume_tensor(arr: np.ndarray, device="cpu") -> torch.Tensor:
    """A (D, H, W) array as a (1, 1, D, H, W) tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None].to(device)
