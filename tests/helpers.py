"""Test helpers: small random volumes and smooth random fields."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from models.backend import CPU_BF16_ENV, cpu_has_native_bf16

needs_native_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason=f"this CPU has no native bf16 (AMX or AVX-512-bf16), or {CPU_BF16_ENV}=0: the bf16 kernels cannot run")


def smooth_field(shape, amplitude, sigma=3.0, seed=0, dtype=torch.float32):
    """A smooth random displacement (1, 3, D, H, W): Gaussian-filtered noise scaled to max |u| = amplitude."""
    rng = np.random.default_rng(seed)
    comps = []
    for _ in range(3):
        c = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
        comps.append(c / np.abs(c).max() * amplitude)
    return torch.tensor(np.stack(comps)[None], dtype=dtype)


def smooth_image(shape, seed=0, sigma=1.5, dtype=torch.float32):
    """A textured, smooth random image (1, 1, D, H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random(shape), sigma)
    x = (x - x.min()) / (x.max() - x.min())
    return torch.tensor(x[None, None], dtype=dtype)




def blob_labels(shape, n_labels=4, sigma=2.5, seed=0):
    """A label map (D, H, W) of smooth random blobs: labels 1..n_labels inside an ellipsoid, 0 outside."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n_labels, *shape)), (0, sigma, sigma, sigma))
    lab = np.argmax(noise, axis=0) + 1
    idx = np.indices(shape)
    r = sum(((idx[i] - (shape[i] - 1) / 2) / (0.42 * shape[i])) ** 2 for i in range(3))
    lab[r > 1] = 0
    return lab.astype(np.int64)


def synthetic_pair(shape=(32, 32, 32), amplitude=2.5, seed=0):
    """(moving, fixed, moving_labels, fixed_labels) as (1, 1, D, H, W) tensors.

    The fixed labels are blobs; each label gets an intensity, the image is smoothed; the
    moving image and labels are the fixed ones warped by a smooth random displacement.
    """
    from utils.spatial import warp, warp_labels
    lab = blob_labels(shape, seed=seed)
    rng = np.random.default_rng(seed + 1)
    levels = np.concatenate([[0.0], rng.uniform(0.3, 1.0, lab.max())])
    img = ndimage.gaussian_filter(levels[lab], 0.7)
    fixed = torch.tensor(img[None, None], dtype=torch.float32)
    fixed_lab = torch.tensor(lab[None, None])
    u = smooth_field(shape, amplitude, sigma=4.0, seed=seed + 2)
    return warp(fixed, u), fixed, warp_labels(fixed_lab, u), fixed_lab
