"""The embedded demo data set: synthetic subjects made from a real brain template.

``data/demo/mni152_2mm.npz`` (built by ``scripts/build_demo_template.py``; provenance in
``data/demo/PROVENANCE.md``) holds the MNI ICBM152 2009a T1 at 2 mm, 80 x 96 x 80, and a
20-structure label map. Each subject is the template under

1. a random smooth diffeomorphic deformation: scaling and squaring of a smooth random
   velocity field (Gaussian-filtered noise, scaled to a maximum length);
2. a small random affine (rotation, scaling, translation about the volume centre);
3. intensity changes: a smooth multiplicative bias field, a gamma curve and Gaussian noise.

The image and the label map are warped by the same displacement, so labels move with
images by construction. Everything is seeded: the same seed gives the same data set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .spatial import compose, identity_grid, integrate_velocity, warp, warp_labels

TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "demo" / "mni152_2mm.npz"
DEMO_LABELS = tuple(range(1, 21))


@dataclass
class DemoSettings:
    """How strongly subjects differ from the template (voxel units of the 2 mm grid)."""
    max_velocity: float = 5.0        # largest velocity before integration
    smoothness: float = 6.0          # Gaussian sigma of the velocity noise
    rotation_deg: float = 5.0
    scaling: float = 0.05
    translation: float = 3.0
    bias_strength: float = 0.2
    gamma_range: tuple = (0.8, 1.25)
    noise_std: float = 0.02
    downsample: int = 1              # 2 gives a 40 x 48 x 40 set at 4 mm for quick runs


def load_template(downsample: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 float32 in [0, 1], labels int16, affine) of the embedded template."""
    if not TEMPLATE.is_file():
        raise FileNotFoundError(f"{TEMPLATE}: demo template missing; run scripts/build_demo_template.py")
    d = np.load(TEMPLATE)
    t1, labels, affine = d["t1"].astype(np.float32) / 255.0, d["labels"].astype(np.int16), d["affine"].copy()
    if downsample > 1:
        k = downsample
        t1 = F.avg_pool3d(torch.from_numpy(t1)[None, None], k)[0, 0].numpy()
        labels = labels[k // 2::k, k // 2::k, k // 2::k][:t1.shape[0], :t1.shape[1], :t1.shape[2]]
        affine[:3, :3] *= k
    return t1, labels, affine


def random_velocity(shape, rng: np.random.Generator, max_length: float, sigma: float) -> torch.Tensor:
    """A smooth random velocity (1, 3, D, H, W) whose longest vector is ``max_length`` voxels."""
    v = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="constant") for _ in range(3)])
    length = np.sqrt((v ** 2).sum(0)).max()
    return torch.from_numpy(v / length * max_length)[None].float()


def rotation_about_axes(angles_rad) -> np.ndarray:
    """R = R0 R1 R2, R_i a rotation by angles_rad[i] about array axis i."""
    rot = np.eye(3)
    for axis, a in enumerate(angles_rad):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = rot @ r
    return rot


def random_affine_field(shape, rng: np.random.Generator, s: DemoSettings) -> torch.Tensor:
    """Displacement (1, 3, D, H, W) of x -> A (x - c) + c + t with a small random A and t."""
    rot = rotation_about_axes(np.deg2rad(rng.uniform(-s.rotation_deg, s.rotation_deg, 3)))
    A = rot @ np.diag(1.0 + rng.uniform(-s.scaling, s.scaling, 3))
    return affine_field(shape, A, rng.uniform(-s.translation, s.translation, 3))


def affine_field(shape, matrix: np.ndarray, translation) -> torch.Tensor:
    """Displacement (1, 3, D, H, W) of x -> matrix (x - c) + c + translation, c the volume centre (voxels)."""
    A, t = np.asarray(matrix, dtype=np.float64), np.asarray(translation, dtype=np.float64)
    x = identity_grid(shape, dtype=torch.float64)[0].numpy().reshape(3, -1)
    c = (np.array(shape, dtype=np.float64)[:, None] - 1) / 2
    u = (A - np.eye(3)) @ (x - c) + t[:, None]
    return torch.from_numpy(u.reshape(1, 3, *shape)).float()


def intensity_changes(img: np.ndarray, rng: np.random.Generator, s: DemoSettings) -> np.ndarray:
    """Bias field (smooth, multiplicative), gamma and Gaussian noise; result clipped to [0, 1]."""
    coarse = rng.standard_normal((4, 4, 4))
    bias = ndimage.zoom(coarse, [n / 4 for n in img.shape], order=3)[:img.shape[0], :img.shape[1], :img.shape[2]]
    bias = np.exp(s.bias_strength * bias / (np.abs(bias).max() + 1e-8))
    gamma = rng.uniform(*s.gamma_range)
    out = np.clip(img * bias, 0, None) ** gamma
    out = out / max(out.max(), 1e-8)
    out = out + rng.normal(0.0, s.noise_std, img.shape) * (img > 0.02)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def make_subject(t1: np.ndarray, labels: np.ndarray, seed: int, settings: DemoSettings | None = None,
                 misalignment: tuple[float, float] | None = None):
    """One synthetic subject: (image, labels, displacement u (1, 3, D, H, W)).

    ``image(x) = intensity(t1(x + u(x)))`` and ``labels(x) = template_labels(x + u(x))``,
    with u the deformation followed by the affine. ``misalignment`` = (degrees, voxels) adds,
    last, a rotation by that angle about array axis 2 and a shift by that many voxels along
    axis 0: the same subject, misaligned, still made by one interpolation of the template.
    """
    s = settings or DemoSettings()
    rng = np.random.default_rng(seed)
    shape = t1.shape
    u_def = integrate_velocity(random_velocity(shape, rng, s.max_velocity / s.downsample,
                                              s.smoothness / s.downsample), 7)
    u_aff = random_affine_field(shape, rng, DemoSettings(**{**s.__dict__, "translation": s.translation / s.downsample}))
    u = compose(u_aff, u_def)
    if misalignment is not None:
        degrees, voxels = misalignment
        u = compose(affine_field(shape, rotation_about_axes([0.0, 0.0, np.deg2rad(degrees)]), [voxels, 0.0, 0.0]), u)
    img = warp(torch.from_numpy(t1)[None, None], u)[0, 0].numpy()
    lab = warp_labels(torch.from_numpy(labels.astype(np.int64))[None, None], u)[0, 0].numpy().astype(np.int16)
    return intensity_changes(img, rng, s), lab, u


def write_demo_dataset(root, n_train: int = 24, n_test: int = 6, seed: int = 0,
                       settings: DemoSettings | None = None) -> Path:
    """Write the demo set in the OASIS layout: fixed.nii.gz (the template as atlas),
    Train/ and Test/ OASIS_XXXX_0000.nii.gz, label/<same names> and the atlas label
    label/OASIS_0395_0000.nii.gz."""
    s = settings or DemoSettings()
    root = Path(root)
    t1, labels, affine = load_template(s.downsample)
    for sub in ("Train", "Test", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(t1, affine), str(root / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(root / "label" / "OASIS_0395_0000.nii.gz"))
    for i in range(1, n_train + n_test + 1):
        img, lab, _ = make_subject(t1, labels, seed * 10007 + i, s)
        name = f"OASIS_{i:04d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(img, affine), str(root / ("Train" if i <= n_train else "Test") / name))
        nib.save(nib.Nifti1Image(lab, affine), str(root / "label" / name))
    (root / "DONE").write_text(f"n_train={n_train} n_test={n_test} seed={seed} settings={s}\n")
    return root
