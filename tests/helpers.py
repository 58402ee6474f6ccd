"""Test helpers: small random volumes and smooth random fields."""
import numpy as np
import torch
from scipy import ndimage


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


