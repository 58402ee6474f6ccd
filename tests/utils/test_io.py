"""Volume I/O: geometry kept on write, and each kind of bad file named with its problem."""
import errno
import locale
import os
import pickle
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.layouts import AFFINE
from utils.datasets import Pair, Side, VolumeCache
from utils.config import DataConfig
from utils.io import DataError, WriteError, atomic_write, load_volume, load_pickle_pair, save_like


def _nii(arr, path, affine=AFFINE):
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def test_save_like_keeps_fixed_geometry(tmp_path):
    ref = load_volume(_nii(np.random.rand(6, 7, 8).astype(np.float32), tmp_path / "fixed.nii.gz"))
    out = save_like(np.ones((6, 7, 8), np.float32), ref, tmp_path / "out" / "w.nii.gz")
    img = nib.load(str(out))
    assert np.allclose(img.affine, AFFINE) and img.shape == (6, 7, 8)
    field = save_like(np.zeros((3, 6, 7, 8), np.float32), ref, tmp_path / "u.nii.gz")
    f = nib.load(str(field))
    assert f.shape == (6, 7, 8, 1, 3) and f.header.get_intent()[0] == "vector"
    assert np.allclose(f.affine, AFFINE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.nii.gz", "out", "u.nii.gz"]  # no temp files
    with pytest.raises(DataError, match="does not match the reference grid"):
        save_like(np.zeros((5, 7, 8)), ref, tmp_path / "bad.nii.gz")


@pytest.mark.parametrize("kind,arr,message", [
    ("image", np.random.rand(4, 5), "expected a 3D image"),
    ("image", np.random.rand(4, 5, 6, 2), "expected a 3D image"),
    ("image", np.where(np.eye(4)[:, :, None] > 0, np.nan, 1.0) * np.ones((4, 4, 5)), "NaN/Inf"),
    ("label", np.zeros((4, 5, 6)), "empty"),
    ("label", np.random.rand(4, 5, 6) * 3, "non-integer"),
])
def test_bad_volumes_named(tmp_path, kind, arr, message):
    path = _nii(arr.astype(np.float32), tmp_path / "bad.nii.gz")
    with pytest.raises(DataError, match=message) as exc:
        load_volume(path, kind)
    assert "bad.nii.gz" in str(exc.value)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="corrupt.nii.gz: cannot read NIfTI"):
        load_volume(tmp_path / "corrupt.nii.gz")
    with pytest.raises(DataError, match="absent.nii.gz: file not found"):
        load_volume(tmp_path / "absent.nii.gz")
    with open(tmp_path / "one.pkl", "wb") as fh:
        pickle.dump(np.zeros((4, 4, 4)), fh)
    with pytest.raises(DataError, match="expected a pickled \\(image, label\\) pair"):
        load_pickle_pair(tmp_path / "one.pkl")
    with open(tmp_path / "mismatch.pkl", "wb") as fh:
        pickle.dump((np.random.rand(4, 4, 4), np.ones((4, 4, 5))), fh)
    with pytest.raises(DataError, match="differ in shape"):
        load_pickle_pair(tmp_path / "mismatch.pkl")


def test_image_label_shape_mismatch_named(tmp_path):
    img = _nii(np.random.rand(6, 7, 8).astype(np.float32), tmp_path / "img.nii.gz")
    lab = _nii(np.ones((6, 7, 9), np.int16), tmp_path / "lab.nii.gz")
    side = Side("s", str(img), str(lab))
    cache = VolumeCache(DataConfig())
    with pytest.raises(DataError, match="shape mismatch: .*img.nii.gz.*lab.nii.gz"):
        cache.get(side)
    other = _nii(np.random.rand(6, 7, 9).astype(np.float32), tmp_path / "other.nii.gz")
    with pytest.raises(DataError, match="resample to a common grid"):
        cache.pair_tensors(Pair(Side("a", str(img), None), Side("b", str(other), None)))


class _Opens:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_volume_pickles_load_through_the_restricted_unpickler(tmp_path, protocol):
    img = np.random.rand(4, 5, 6).astype(np.float32)
    lab = (np.random.rand(4, 5, 6) * 3).astype(np.int16)
    lab[0, 0, 0] = 1
    path = tmp_path / "s.pkl"
    path.write_bytes(pickle.dumps((img, lab), protocol=protocol))
    image, label = load_pickle_pair(path)
    assert np.array_equal(image.array, img) and np.array_equal(label.array, lab)


def test_pickle_naming_anything_else_is_refused_unrun(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps((_Opens(marker), np.zeros((4, 4, 4)))))
    with pytest.raises(DataError, match=r"evil.pkl: .*refused to load io.open"):
        load_pickle_pair(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps((np.zeros((4, 4, 4)), {"x": __import__("collections").OrderedDict()})))
    with pytest.raises(DataError, match="refused to load collections.OrderedDict"):
        load_pickle_pair(path)


def _oblique_sitk_image(sitk):
    arr = (np.random.default_rng(0).random((6, 7, 8)) * 1000).astype(np.int16)     # (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 1.1, 2.5))
    img.SetOrigin((10.0, -20.0, 5.0))
    a = 0.3
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    img.SetDirection(direction.ravel().tolist())
    return img, direction


def _write_dicom_series(sitk, img, direction, folder):
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")
        s.SetMetaData("0008|0060", "MR")
        s.SetMetaData("0020|0037", "\\".join(str(v) for v in direction[:, :2].T.ravel()))
        s.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        s.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)


def test_other_formats_keep_their_geometry(tmp_path):
    """.mha, .nrrd and a DICOM series read with the affine that nibabel reads from the same image
    written as NIfTI by SimpleITK (an independent LPS -> RAS conversion)."""
    sitk = pytest.importorskip("SimpleITK")
    img, direction = _oblique_sitk_image(sitk)
    sitk.WriteImage(img, str(tmp_path / "ref.nii.gz"))
    ref = nib.load(str(tmp_path / "ref.nii.gz"))
    expected = np.asarray(ref.dataobj).astype(np.float32)
    for name in ("img.mha", "img.nrrd"):
        sitk.WriteImage(img, str(tmp_path / name))
    process_locale = locale.setlocale(locale.LC_ALL)
    _write_dicom_series(sitk, img, direction, tmp_path / "series")
    locale.setlocale(locale.LC_ALL, process_locale)            # (GDCM's writer sets the C locale too)
    for path in (tmp_path / "img.mha", tmp_path / "img.nrrd", tmp_path / "series"):
        vol = load_volume(path)
        assert np.allclose(vol.affine, ref.affine, atol=1e-5), path
        assert np.array_equal(vol.array, expected), path
        # the process's locale (and so the default encoding of text files) is left as it was
        assert locale.setlocale(locale.LC_ALL) == process_locale, path


def test_unknown_format_and_missing_simpleitk_are_named(tmp_path, monkeypatch):
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="x.png: unknown image format"):
        load_volume(tmp_path / "x.png")
    (tmp_path / "y.mha").write_bytes(b"ObjectType = Image")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(DataError, match="y.mha: reading this format needs SimpleITK"):
        load_volume(tmp_path / "y.mha")


def test_label_dtype_holds_every_value():
    from utils.io import label_dtype
    assert label_dtype(np.array([0, 35])) == np.int16
    assert label_dtype(np.array([0, 32768])) == np.int32 and label_dtype(np.array([-32769, 0])) == np.int32
    assert label_dtype(np.array([0, 2 ** 31])) == np.int64 and label_dtype(np.zeros((0,), np.int64)) == np.int16


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EDQUOT, errno.EROFS])
def test_a_write_the_disk_refuses_names_the_file_and_keeps_the_previous_version(tmp_path, error):
    target = tmp_path / "per_case.csv"
    target.write_text("previous")

    def refused(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError(error, os.strerror(error))
    with pytest.raises(WriteError) as caught:
        atomic_write(target, refused)
    assert str(caught.value) == f"{target}: cannot write ({os.strerror(error)}); its previous version is unchanged"
    assert target.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["per_case.csv"]
    with pytest.raises(ValueError, match="not about the disk"):         # other errors pass through as they are
        atomic_write(tmp_path / "new.csv", lambda tmp: (_ for _ in ()).throw(ValueError("not about the disk")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_case.csv"]
