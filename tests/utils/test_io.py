"""Volume I/O: geometry kept on write, and each kind of bad file named with its problem."""
import pickle

import nibabel as nib
import numpy as np
import pytest

from tests.layouts import AFFINE
from utils.datasets import Pair, Side, VolumeCache
from utils.config import DataConfig
from utils.io import DataError, load_nifti, load_pickle_pair, save_like


def _nii(arr, path, affine=AFFINE):
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def test_save_like_keeps_fixed_geometry(tmp_path):
    ref = load_nifti(_nii(np.random.rand(6, 7, 8).astype(np.float32), tmp_path / "fixed.nii.gz"))
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
        load_nifti(path, kind)
    assert "bad.nii.gz" in str(exc.value)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="corrupt.nii.gz: cannot read NIfTI"):
        load_nifti(tmp_path / "corrupt.nii.gz")
    with pytest.raises(DataError, match="absent.nii.gz: file not found"):
        load_nifti(tmp_path / "absent.nii.gz")
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
