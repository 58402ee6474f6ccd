"""Build the embedded demo template (data/demo/mni152_2mm.npz) from the MNI ICBM152 2009a files.

The files ship inside the nilearn wheel (nilearn/datasets/data/mni_icbm152_*_09a_converted.nii.gz);
nilearn is needed only here, never at run time. Either install it or point to its wheel:

    pip install nilearn && python scripts/build_demo_template.py
    pip download --no-deps nilearn -d /tmp/w && python scripts/build_demo_template.py --wheel /tmp/w/nilearn-*.whl

What is derived (documented in data/demo/PROVENANCE.md):
* T1, grey- and white-matter probability maps resampled from 1 mm to 2 mm (block average of
  2x2x2 voxels) and cropped to a 80 x 96 x 80 box around the brain;
* a label map of 20 structures: voxels where GM + WM > 0.5 take the larger tissue class, split
  by hemisphere (MNI x < 0 left, x >= 0 right) and into five lobe-like regions by MNI
  coordinates (cerebellum: z < -20 and y < -45; occipital: y < -70; temporal: z < 5 and
  -70 <= y < 10; frontal: y >= -20; parietal: the rest). Label = 1 + tissue*10 + hemisphere*5 + region
  (tissue 0 = GM, 1 = WM; region order frontal, parietal, temporal, occipital, cerebellum).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "demo" / "mni152_2mm.npz"
NAMES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
CROP = (80, 96, 80)
REGIONS = ("frontal", "parietal", "temporal", "occipital", "cerebellum")


def _from_bytes(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def read_template(wheel: str | None) -> dict[str, nib.Nifti1Image]:
    if wheel:
        with zipfile.ZipFile(wheel) as zf:
            return {k: _from_bytes(zf.read(f"nilearn/datasets/data/{n}")) for k, n in NAMES.items()}
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nilearn is not installed: pip install nilearn, or pass --wheel PATH")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return {k: nib.load(str(data_dir / n)) for k, n in NAMES.items()}


def downsample2(x: np.ndarray) -> np.ndarray:
    s = [n - n % 2 for n in x.shape]
    x = x[:s[0], :s[1], :s[2]]
    return x.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean(axis=(1, 3, 5))


def region_of(mni: np.ndarray) -> np.ndarray:
    """Lobe-like region index (see module docstring) from MNI coordinates (3, ...)."""
    y, z = mni[1], mni[2]
    region = np.full(y.shape, 1)                          # parietal by default
    region[y >= -20] = 0                                   # frontal
    region[(z < 5) & (y >= -70) & (y < 10)] = 2            # temporal
    region[y < -70] = 3                                    # occipital
    region[(z < -20) & (y < -45)] = 4                      # cerebellum
    return region


def build(imgs: dict[str, nib.Nifti1Image]) -> dict[str, np.ndarray]:
    vols = {k: downsample2(np.asarray(v.dataobj, dtype=np.float32)) for k, v in imgs.items()}
    affine = imgs["t1"].affine.copy()
    affine[:3, :3] *= 2.0
    affine[:3, 3] += 0.5 * np.diag(imgs["t1"].affine[:3, :3])   # centre of each 2x2x2 block
    gm, wm = vols["gm"] / 255.0, vols["wm"] / 255.0
    brain = (gm + wm) > 0.5
    # crop a fixed-size box centred on the brain
    idx = np.argwhere(brain)
    centre = (idx.min(0) + idx.max(0)) // 2
    lo = np.clip(centre - np.array(CROP) // 2, 0, np.array(gm.shape) - CROP)
    box = tuple(slice(a, a + n) for a, n in zip(lo, CROP))
    affine[:3, 3] += affine[:3, :3] @ lo
    t1, gm, wm, brain = vols["t1"][box], gm[box], wm[box], brain[box]
    ijk = np.indices(CROP).reshape(3, -1)
    mni = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *CROP)
    tissue = (wm > gm).astype(np.int64)
    hemisphere = (mni[0] >= 0).astype(np.int64)
    labels = 1 + tissue * 10 + hemisphere * 5 + region_of(mni)
    labels[~brain] = 0
    t1 = (t1 - t1.min()) / (t1.max() - t1.min())
    return {"t1": np.round(t1 * 255).astype(np.uint8), "labels": labels.astype(np.uint8),
            "affine": affine, "label_names": np.array(label_names())}


def label_names() -> list[str]:
    return [f"{t}_{h}_{r}" for t in ("gm", "wm") for h in ("left", "right") for r in REGIONS]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheel", help="path to a nilearn wheel (read directly, nothing installed)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    arrays = build(read_template(args.wheel))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    out.write_bytes(buf.getvalue())
    present = np.unique(arrays["labels"])[1:]
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): T1 {arrays['t1'].shape}, {len(present)} labels")


if __name__ == "__main__":
    main()
