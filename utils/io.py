"""Reading and writing volumes, with errors that name the file and the problem.

Arrays are kept in the file's voxel index order (i, j, k), as nibabel returns them.
Everything written as NIfTI carries a reference image's affine and header (the
fixed image of the pair), so outputs overlay the fixed image in ITK-SNAP or 3D Slicer.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


class DataError(ValueError):
    """An input file or folder that cannot be used; the message names it and says why."""


@dataclass
class Volume:
    """A 3D array with the geometry of the file it came from (identity affine for pickles)."""
    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None
    path: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


def _as_3d(arr: np.ndarray, path, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3D {what}, got an array of shape {arr.shape}")
    if min(arr.shape) < 2:
        raise DataError(f"{path}: {what} of shape {arr.shape} has an axis shorter than 2 voxels")
    return arr


MAX_LABEL_VALUES = 1000     # more distinct values than this: an intensity image, not a label map


def require_file(path, what: str = "file") -> Path:
    """``path`` as a Path when it is a regular file; DataError naming it (and what it is) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a {what}")
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: is not a regular file; expected a {what}")
    return path


def check_image_values(arr: np.ndarray, path) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{path}: image has {bad} NaN/Inf voxel(s)")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise DataError(f"{path}: image is constant (every voxel {lo:g}): nothing to register")


def check_label_values(arr: np.ndarray, path) -> np.ndarray:
    """Integer label values of ``arr`` as int32; DataError for NaN/Inf, non-integer, negative or
    out-of-range values, an empty map, or an intensity image given as a label map."""
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: label map has NaN/Inf voxels")
    rounded = np.rint(arr)
    if np.abs(arr - rounded).max() > 1e-3:
        raise DataError(f"{path}: label map holds non-integer values (is this an image?)")
    lo, hi = float(rounded.min()), float(rounded.max())
    if lo < 0:
        raise DataError(f"{path}: label map holds negative values (min {lo:g}); labels are 0 (background) "
                        f"or positive integers")
    if hi > np.iinfo(np.int32).max:
        raise DataError(f"{path}: label value {hi:g} is above the int32 range; labels must be < 2**31")
    if not rounded.any():
        raise DataError(f"{path}: label map is empty (all background)")
    labels = rounded.astype(np.int32)
    count = int(np.count_nonzero(np.bincount(labels.ravel()))) if hi < 2 ** 20 else int(np.unique(labels).size)
    if count > MAX_LABEL_VALUES:
        raise DataError(f"{path}: label map has {count} distinct values (more than {MAX_LABEL_VALUES}): "
                        f"is this an intensity image?")
    return labels


def check_affine(affine: np.ndarray, path) -> np.ndarray:
    """A usable voxel-to-world affine (finite, invertible); DataError naming the file otherwise."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: the voxel-to-world affine (sform/qform) is singular or not finite: "
                        f"{affine[:3].round(4).tolist()}; fix the header")
    return affine


NIFTI_SUFFIXES = (".nii", ".nii.gz")
SIMPLEITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
PLCREG_FIELD_INTENT = "plcreg_voxels"     # NIfTI intent name of this project's own (voxel) displacement files
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])   # flips x and y: RAS <-> LPS (its own inverse)


def read_nifti_arrays(path: Path):
    """(data array as stored, affine, header copy) of a NIfTI file; DataError naming it when unreadable."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    return data, img.affine, img.header.copy()


def _read_simpleitk(path: Path):
    """An image file SimpleITK reads, or a folder holding one DICOM series; array in (i, j, k) order
    and the RAS voxel-to-world affine of its (LPS) origin, spacing and direction."""
    what = "a DICOM series" if path.is_dir() else "this format"
    try:
        import SimpleITK as sitk
    except ImportError:
        raise DataError(f"{path}: {'is a folder; ' if path.is_dir() else ''}reading {what} needs SimpleITK "
                        f"(pip install SimpleITK); NIfTI (.nii, .nii.gz) is read without it") from None
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)       # its console warnings; errors are reported below
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise DataError(f"{path}: is a folder without a DICOM series; expected an image file or a folder "
                                f"holding one DICOM series")
            if len(series) > 1:
                raise DataError(f"{path}: the folder holds {len(series)} DICOM series; give a folder with one")
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
            image = sitk.ReadImage(files)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot read the image ({str(exc).strip().splitlines()[-1]})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a 3D single-component image, got {image.GetDimension()}D with "
                        f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), RAS_TO_LPS @ lps, None


def volume_format(path) -> str:
    """'nifti' or 'simpleitk' (other image formats and DICOM folders), from the name."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.is_dir() or name.endswith(SIMPLEITK_SUFFIXES):
        return "simpleitk"
    raise DataError(f"{path}: unknown image format; expected NIfTI ({', '.join(NIFTI_SUFFIXES)}), "
                    f"{', '.join(SIMPLEITK_SUFFIXES)} or a DICOM folder (the last ones need SimpleITK)")


def load_volume(path, kind: str = "image") -> Volume:
    """Read a 3D image (float32) or label map (int32), checking it on the way.

    NIfTI is read by nibabel; .mha, .mhd, .nrrd, .nhdr and a folder of one DICOM series by
    SimpleITK when it is installed (their LPS geometry turned into a RAS affine, exactly).
    Raises DataError for a missing, unreadable or non-3D file, NaN/Inf intensities, or an
    empty / non-integer label map.
    """
    path = Path(path)
    if not path.exists():
        require_file(path, "file")
    fmt = volume_format(path)
    if fmt == "nifti":
        data, affine, header = read_nifti_arrays(require_file(path, "file"))
    else:
        if not path.is_dir():
            require_file(path, "file")
        data, affine, header = _read_simpleitk(path)
    affine = check_affine(affine, path)
    arr = _as_3d(data, path, kind)
    if kind == "label":
        arr = check_label_values(arr.astype(np.float64), path)
    else:
        arr = arr.astype(np.float32)
        check_image_values(arr, path)
    return Volume(arr, affine, header, str(path))


class VolumeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, tuples, lists, dicts and plain numbers, and nothing else.

    A pickle names every class or function it needs; only those that rebuild numpy arrays and
    scalars are admitted (``ALLOWED``), so a crafted file cannot run code while it is read.
    """
    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
          for name in ("_reconstruct", "scalar")),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays, tuples, lists "
                                         f"and numbers are allowed in a volume pickle")
        return super().find_class(module, name)


def load_pickle_pair(path) -> tuple[Volume, Volume]:
    """Read an IXI-style pickle holding ``(image, label)``; identity geometry.

    The file is read with a restricted unpickler (``VolumeUnpickler``): a pickle that names
    anything but numpy arrays and plain containers is refused, never executed.
    """
    path = require_file(path, "file")
    try:
        with open(path, "rb") as fh:
            obj = VolumeUnpickler(fh).load()
    except Exception as exc:
        raise DataError(f"{path}: cannot read pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled (image, label) pair, got {type(obj).__name__}")
    image = _as_3d(obj[0], path, "image").astype(np.float32)
    check_image_values(image, path)
    label = check_label_values(_as_3d(obj[1], path, "label map").astype(np.float64), path)
    if image.shape != label.shape:
        raise DataError(f"{path}: image {image.shape} and label {label.shape} differ in shape")
    eye = np.eye(4)
    return Volume(image, eye, None, str(path)), Volume(label, eye, None, str(path))


def check_same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> None:
    """DataError unless two volumes (an image and its label map) share shape and affine."""
    if a.array.shape != b.array.shape:
        raise DataError(f"shape mismatch: {a.path} is {a.array.shape} but {b.path} is {b.array.shape}")
    if not np.allclose(a.affine, b.affine, atol=atol):
        raise DataError(f"{b.path}: its voxel-to-world affine differs from that of {a.path} "
                        f"(max difference {np.abs(a.affine - b.affine).max():.4g} mm); a label map must lie "
                        f"on its image's grid")


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
TEMP_PREFIX = ".plcreg-partial."      # the one name of this project's temporary files
# errors of a write that the user can act on (full disk, quota, permissions, read-only disk, size limit)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
_write_observers: list = []


class WriteError(DataError):
    """A file could not be written (disk full, permissions, ...); the message names it and what is kept."""


def observe_writes(observer) -> None:
    """Call ``observer(path, phase)`` around every ``atomic_write``: phase 'start' before the
    file is written, 'done' after it is in place (result folders record their files so)."""
    _write_observers.append(observer)


def unobserve_writes(observer) -> None:
    if observer in _write_observers:
        _write_observers.remove(observer)


def notify_write(path: Path, phase: str) -> None:
    """Tell the observers of a file placed without ``atomic_write`` (a hard link): phase
    'start' before, 'done' after."""
    for observer in list(_write_observers):
        observer(Path(path), phase)


def ensure_dir(path) -> Path:
    """Create folder ``path`` (and its parents); DataError when a part of it is a regular file."""
    path = Path(path)
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            raise DataError(f"{path}: cannot create this folder: {part} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot create this folder ({exc.strerror or exc})") from exc
    return path


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``.

    The temporary file lies in the same folder, named ``.plcreg-partial.<name>.<random><suffix>``
    (``remove_stale_temporaries`` finds those a killed process left, and nothing else), and
    gets the mode a plain ``open`` would give it (0666 less the umask). A full disk, a quota,
    missing permissions or a read-only disk raise ``WriteError`` naming the file; the
    temporary is removed and an earlier version of ``path`` stays as it was.
    """
    path = Path(path)
    ensure_dir(path.parent)
    notify_write(path, "start")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix or ".tmp"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name[:-len(suffix)] or path.name}.",
                                   suffix=suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        problem = _write_problem(exc)
        if problem is None:
            raise
        kept = "its previous version is unchanged" if path.exists() else "nothing was written in its place"
        raise WriteError(f"{path}: cannot write ({problem}); {kept}") from None
    notify_write(path, "done")
    return path


def _write_problem(exc: BaseException) -> str | None:
    """The user-facing reason of a failed write, or None for errors that are not about the disk."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            return exc.strerror or os.strerror(exc.errno)
        exc = exc.__cause__ or exc.__context__        # torch.save and nibabel wrap the OSError
    return None


_STALE_TEMPORARY = re.compile(r"^" + re.escape(TEMP_PREFIX) + r".+\.[a-z0-9_]{8}(\.nii\.gz|\.[A-Za-z0-9_]+)$")


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporary files that writes killed midway left in ``folder``; returns them.

    Only files named as ``atomic_write`` names its temporaries
    (``.plcreg-partial.<name>.<8 random characters><suffix>``) are touched; call it only while
    holding the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir()
             if _STALE_TEMPORARY.match(p.name) and p.is_file() and not p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def image_stem(path) -> str:
    """A file's name without its image extension (``a.nii.gz`` -> ``a``, ``b.mha`` -> ``b``)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def label_dtype(labels) -> np.dtype:
    """The smallest of int16, int32 and int64 that holds every value of a label map (never a
    silent wrap: 40000 does not fit int16)."""
    labels = np.asarray(labels)
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    for dtype in (np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def save_like(array: np.ndarray, reference: Volume, path, dtype=None) -> Path:
    """Write ``array`` as NIfTI with the reference volume's affine and header.

    ``array`` is (D, H, W) for images and label maps, or (3, D, H, W) for a displacement,
    written as a (D, H, W, 1, 3) vector image (NIfTI intent 'vector' named ``plcreg_voxels``;
    voxel units, component i along array axis i).
    """
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 3:
        array = np.moveaxis(array, 0, -1)[:, :, :, None, :]
    ref_shape = reference.array.shape
    if array.shape[:3] != ref_shape:
        raise DataError(f"{path}: array of shape {array.shape[:3]} does not match the reference grid {ref_shape} "
                        f"of {reference.path}")
    if dtype is not None:
        array = array.astype(dtype)
    header = reference.header.copy() if reference.header is not None else nib.Nifti1Header()
    img = nib.Nifti1Image(array, reference.affine, header)
    img.set_data_dtype(array.dtype)
    if array.ndim == 5:
        img.header.set_intent("vector", name=PLCREG_FIELD_INTENT)
    else:
        img.header.set_intent("none")
    img.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
    img.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
