"""Transforms in ITK's and ANTs's file formats.

Frames. NIfTI affines (and this project's world coordinates) are RAS: +x right, +y anterior.
ITK works in LPS (+x left, +y posterior): a point flips its first two coordinates,
``p_LPS = diag(-1, -1, 1) p_RAS``, and so does a displacement vector.

* Displacement field: a NIfTI vector image of shape (X, Y, Z, 1, 3) (intent 'vector') on the
  fixed image's grid, holding for every fixed point ``p`` the vector ``d`` in millimetres of
  the LPS frame such that ``p + d`` is the point read in the next space, as
  ``antsApplyTransforms`` and SimpleITK's ``DisplacementFieldTransform`` read it. From this
  project's field ``u`` (voxels, component i along array axis i):
  ``d_RAS = A[:3, :3] u``, ``d_LPS = diag(-1, -1, 1) d_RAS``.
* Affine: an ITK transform file (``#Insight Transform File V1.0``, ``AffineTransform_double_3_3``,
  12 parameters: the 3x3 matrix row by row, then the translation, and the centre in
  ``FixedParameters``): fixed LPS point -> moving LPS point, ``y = M (x - c) + c + t``.
  ANTs's binary ``.mat`` files hold the same numbers and are read too. A CompositeTransform
  text file of affines is read as their composition in ITK's order (the file's last transform
  acts on the point first); several transforms without that header are refused, as ITK's
  readers would silently take the first.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .checks import as_spatial_field
from .io import RAS_TO_LPS, DataError, atomic_write, require_file

AFFINE_TYPES = ("AffineTransform_double_3_3", "AffineTransform_float_3_3", "MatrixOffsetTransformBase_double_3_3",
                "MatrixOffsetTransformBase_float_3_3")



# ---------------------------------------------------------------------------
# displacement fields
# ---------------------------------------------------------------------------
def itk_displacement(u, affine: np.ndarray) -> np.ndarray:
    """This project's field (3, D, H, W) or (1, 3, D, H, W), voxels -> ITK's (D, H, W, 1, 3), LPS mm."""
    u = as_spatial_field(u).astype(np.float64)
    ras = np.einsum("ij,j...->i...", np.asarray(affine, dtype=np.float64)[:3, :3], u)
    lps = ras * RAS_TO_LPS[:3, :3].diagonal()[:, None, None, None]
    return np.ascontiguousarray(np.moveaxis(lps, 0, -1)[:, :, :, None, :]).astype(np.float32)


def voxel_displacement(d_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ITK's (X, Y, Z, 1, 3) or (X, Y, Z, 3) LPS millimetres on a grid -> (3, X, Y, Z) voxels of that grid."""
    d = np.asarray(d_lps, dtype=np.float64).reshape(*d_lps.shape[:3], 3)
    ras = np.moveaxis(d, -1, 0) * RAS_TO_LPS[:3, :3].diagonal()[:, None, None, None]
    return np.einsum("ij,j...->i...", np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3]), ras)


def write_itk_displacement(path, u, reference) -> Path:
    """Write ``u`` (on the grid of ``reference``, a Volume) as an ITK/ANTs displacement field NIfTI."""
    data = itk_displacement(u, reference.affine)
    if data.shape[:3] != reference.array.shape:
        raise ValueError(f"{path}: field of shape {data.shape[:3]} is not on the grid {reference.array.shape}")
    img = nib.Nifti1Image(data, reference.affine)
    img.header.set_intent("vector")
    img.set_data_dtype(np.float32)
    img.set_qform(reference.affine, code=1)
    img.set_sform(reference.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


# ---------------------------------------------------------------------------
# affine transform files
# ---------------------------------------------------------------------------
def itk_affine_text(matrix_ras: np.ndarray) -> str:
    """The ITK transform file text of a world (RAS) 4x4 map fixed point -> moving point."""
    lps = RAS_TO_LPS @ np.asarray(matrix_ras, dtype=np.float64) @ RAS_TO_LPS
    params = list(lps[:3, :3].ravel()) + list(lps[:3, 3])
    return ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {' '.join(repr(float(v)) for v in params)}\nFixedParameters: 0 0 0\n")


def write_itk_affine(path, matrix_ras: np.ndarray) -> Path:
    """Write a world (RAS) 4x4 map fixed point -> moving point as an ITK ``.txt`` transform file."""
    text = itk_affine_text(matrix_ras)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _lps_matrix(params, fixed, path) -> np.ndarray:
    params = np.asarray(params, dtype=np.float64).ravel()
    centre = np.asarray(fixed if fixed is not None and len(fixed) else np.zeros(3), dtype=np.float64).ravel()
    if params.size != 12 or centre.size != 3 or not np.isfinite(params).all() or not np.isfinite(centre).all():
        raise DataError(f"{path}: expected 12 finite affine parameters and a 3-value centre, got "
                        f"{params.size} and {centre.size}")
    m = params[:9].reshape(3, 3)
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = params[9:] + centre - m @ centre
    if abs(np.linalg.det(m)) < 1e-12:
        raise DataError(f"{path}: the affine's matrix is singular")
    return out


def _sections(lines: list[str]) -> list[dict]:
    """The transforms of an ITK text file in file order: one dict of fields each."""
    sections: list[dict] = []
    for line in lines:
        if ":" not in line or line.startswith("#"):
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        if key == "Transform":
            sections.append({})
        if sections:
            sections[-1].setdefault(key, value)
    return sections


def _section_matrix(section: dict, path: Path, where: str) -> np.ndarray:
    kind = section.get("Transform", "")
    if kind not in AFFINE_TYPES:
        raise DataError(f"{path}: {where}transform type {kind or '(none)'!r} is not supported; expected one of "
                        f"{', '.join(AFFINE_TYPES)}")
    try:
        params = [float(v) for v in section.get("Parameters", "").split()]
        fixed = [float(v) for v in section.get("FixedParameters", "").split()]
    except ValueError:
        raise DataError(f"{path}: {where}Parameters / FixedParameters are not numbers") from None
    return _lps_matrix(params, fixed, path)


def _read_text(path: Path) -> np.ndarray:
    """One affine, or a CompositeTransform of affines composed as ITK applies them: the last
    transform of the file acts on the point first (T = T1 o T2 o ... o Tn)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not an ITK text transform file (not UTF-8 text)") from None
    sections = _sections(lines)
    if not sections:
        raise DataError(f"{path}: no 'Transform:' line; not an ITK text transform file")
    if sections[0].get("Transform", "").startswith("CompositeTransform"):
        parts = sections[1:]
        if not parts:
            raise DataError(f"{path}: a CompositeTransform without transforms")
        out = np.eye(4)
        for i, section in enumerate(parts, start=1):
            out = out @ _section_matrix(section, path, f"transform {i} of the composite: ")
        return out
    if len(sections) > 1:
        raise DataError(f"{path}: holds {len(sections)} transforms without a CompositeTransform header, which ITK "
                        f"tools read as the first alone; give them as separate -t files (in the order they act "
                        f"on a point) or as one CompositeTransform file")
    return _section_matrix(sections[0], path, "")


def _read_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat
    try:
        mat = loadmat(str(path))
    except Exception as exc:        # scipy raises several types for a damaged file
        raise DataError(f"{path}: cannot read the MATLAB transform file ({type(exc).__name__}: {exc})") from None
    key = next((k for k in AFFINE_TYPES if k in mat), None)
    if key is None:
        raise DataError(f"{path}: no affine transform in the file (expected one of {', '.join(AFFINE_TYPES)})")
    return _lps_matrix(mat[key], mat.get("fixed"), path)


def read_itk_affine(path) -> np.ndarray:
    """An ITK (``.txt``/``.tfm``) or ANTs (``.mat``) affine file as a world (RAS) 4x4 map of the
    points of its fixed space to its moving space."""
    path = require_file(path, "transform file")
    lps = _read_mat(path) if path.suffix.lower() == ".mat" else _read_text(path)
    return RAS_TO_LPS @ lps @ RAS_TO_LPS


__all__ = ["RAS_TO_LPS", "itk_displacement", "voxel_displacement", "write_itk_displacement",
           "itk_affine_text", "write_itk_affine", "read_itk_affine"]
