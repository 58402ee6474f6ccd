"""Every layout's discovery, splits, pairs, label lists and normalisation, on tiny written data sets."""
import numpy as np
import pytest
import torch

from tests.layouts import (write_abdomenctct, write_ixi, write_lpba40, write_oasis, write_srreg)
from utils.config import preset
from utils.datasets import VolumeCache, cache_capacity, discover, natural_key, normalise
from utils.io import DataError


def _data(name, root, **changes):
    cfg = preset(name).data
    for k, v in changes.items():
        setattr(cfg, k, v)
    cfg.root = str(root)
    return cfg


def test_oasis_layout(tmp_path):
    root = write_oasis(tmp_path / "OASIS", n_train=4, n_test=2)
    idx = discover(_data("OASIS", root, val_subjects=1))
    assert len(idx.train) == 3 and len(idx.val) == 1 and len(idx.test) == 2
    assert {s.name for s in idx.train + idx.val} == {"OASIS_0001", "OASIS_0002", "OASIS_0003", "OASIS_0004"}
    assert [s.name for s in idx.test] == ["OASIS_0005", "OASIS_0006"]
    assert idx.atlas.label.endswith("label/OASIS_0395_0000.nii.gz")
    # atlas data: two steps per training subject (atlas -> subject, subject -> atlas)
    item = idx.train_items()[0]
    assert item[0].moving == idx.atlas and item[1].fixed == idx.atlas and item[0].fixed == item[1].moving
    # test pairs: subject (moving) -> atlas (fixed)
    assert all(p.fixed == idx.atlas for p in idx.test_pairs())
    assert idx.test_pairs()[0].moving.label.endswith("label/OASIS_0005_0000.nii.gz")


def test_holdout_is_seeded_and_disjoint(tmp_path):
    root = write_oasis(tmp_path / "OASIS", n_train=6, n_test=1)
    a = discover(_data("OASIS", root, val_subjects=2), seed=3)
    b = discover(_data("OASIS", root, val_subjects=2), seed=3)
    assert [s.name for s in a.val] == [s.name for s in b.val]
    assert not {s.name for s in a.val} & {s.name for s in a.train}


def test_lpba40_layout(tmp_path):
    root = write_lpba40(tmp_path / "LPBA40_delineation", n_train=3, n_test=2)
    idx = discover(_data("LPBA40", root, val_subjects=0))
    assert [s.name for s in idx.train] == ["S11", "S12", "S13"]
    assert [s.name for s in idx.test] == ["S02", "S03"]
    assert idx.test[0].label.endswith("label/S02.delineation.structure.label.nii.gz")
    assert idx.atlas.label.endswith("S01.delineation.structure.label.nii.gz")
    assert len(preset("LPBA40").data.labels) == 54


def test_ixi_layout_uses_val_folder(tmp_path):
    root = write_ixi(tmp_path / "IXI_data", n_train=3, n_val=2, n_test=2)
    idx = discover(_data("IXI", root))
    assert len(idx.train) == 3 and len(idx.val) == 2 and len(idx.test) == 2
    assert idx.train[0].fmt == "pickle" and idx.atlas.image.endswith("atlas.pkl")
    loaded = VolumeCache(idx.config).get(idx.test[0])
    assert loaded.image.array.shape == loaded.label.array.shape == (32, 40, 36)
    assert np.allclose(loaded.image.affine, np.eye(4))
    assert len(preset("IXI").data.labels) == 30


def test_abdomenctct_all_ordered_pairs(tmp_path):
    root = write_abdomenctct(tmp_path / "AbdomenCTCT", n=6)
    idx = discover(_data("AbdomenCTCT", root, n_train=4, n_test=2, val_subjects=2))
    assert len(idx.test) == 2 and len(idx.train) == 2 and len(idx.val) == 2
    assert len(idx.train_items()) == 2 * 1                       # ordered pairs of 2 subjects
    pairs = idx.test_pairs()
    assert {(p.moving.name, p.fixed.name) for p in pairs} == {
        ("AbdomenCTCT_0005", "AbdomenCTCT_0006"), ("AbdomenCTCT_0006", "AbdomenCTCT_0005")}
    assert preset("AbdomenCTCT").data.labels == tuple(range(1, 14))
    with pytest.raises(DataError, match="labelled subjects"):
        discover(_data("AbdomenCTCT", root, n_train=20, n_test=10))


def test_srreg_ct_moving_mr_fixed(tmp_path):
    root = write_srreg(tmp_path / "SR-REG", n=5)
    idx = discover(_data("SRReg", root, n_train=3, val_subjects=1))
    assert [s.name for s in idx.test] == ["1BA004", "1BA005"]
    p = idx.test_pairs()[0]
    assert p.moving.image.endswith("1BA004_ct.nii.gz") and p.fixed.image.endswith("1BA004_mr.nii.gz")
    assert p.moving.label == p.fixed.label and p.moving.label.endswith("seg/1BA004.nii.gz")
    # CT is windowed, MR percentile-normalised: both in [0, 1]
    cache = VolumeCache(idx.config)
    ct, mr = cache.get(p.moving).image.array, cache.get(p.fixed).image.array
    assert ct.min() >= 0 and ct.max() <= 1 and mr.min() >= 0 and mr.max() <= 1
    assert ct.min() == 0.0          # -1000 HU background at the bottom of the window


def test_normalisations():
    x = np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0], dtype=np.float32)
    assert np.allclose(normalise(x, "ct", (-1000.0, 1000.0)), [0, 0, 0.5, 0.75, 1])
    assert np.allclose(normalise(x, "minmax"), (x - x.min()) / (x.max() - x.min()))
    assert np.array_equal(normalise(x, "none"), x)
    y = np.arange(1000, dtype=np.float32)
    p = normalise(y, "percentile")
    assert p.min() == 0 and p.max() == 1 and np.isclose(p[500], (500 - 4.995) / (994.005 - 4.995))
    assert np.array_equal(normalise(np.full(5, 3.0), "minmax"), np.zeros(5))


def test_natural_sort():
    assert sorted(["subject_10", "subject_2", "subject_1"], key=natural_key) == ["subject_1", "subject_2", "subject_10"]


def test_missing_pieces_are_named(tmp_path):
    root = write_oasis(tmp_path / "OASIS")
    with pytest.raises(DataError, match="not found"):
        discover(_data("OASIS", tmp_path / "nowhere"))
    (root / "label" / "OASIS_0002_0000.nii.gz").unlink()
    with pytest.raises(DataError, match="OASIS_0002_0000.nii.gz"):
        discover(_data("OASIS", root))
    root2 = write_lpba40(tmp_path / "LPBA")
    import shutil
    shutil.rmtree(root2 / "delineation_l_norm" / "test")
    with pytest.raises(DataError, match="test folder not found"):
        discover(_data("LPBA40", root2))


def test_prefetching_cache_yields_the_same_samples_and_decodes_each_side_once(tmp_path):
    root = write_oasis(tmp_path / "OASIS", n_train=5, n_test=1)
    cfg = preset("OASIS").data
    cfg.root = str(root)
    index = discover(cfg, root, 0)
    pairs = [p for item in index.train_items() for p in item]
    sides = {s for p in pairs for s in (p.moving, p.fixed)}
    plain = VolumeCache(cfg, capacity=1)                   # re-reads constantly: the reference
    fast = VolumeCache(cfg, capacity=len(sides), workers=2)
    for epoch in range(2):
        for k, pair in enumerate(pairs):
            if k + 1 < len(pairs):
                fast.prefetch([pairs[k + 1].moving, pairs[k + 1].fixed])
            a, b = plain.pair_tensors(pair), fast.pair_tensors(pair)
            assert a.keys() == b.keys()
            for key in ("moving", "fixed", "moving_label", "fixed_label"):
                assert torch.equal(a[key], b[key])
    assert fast.reads == len(sides) and plain.reads > 2 * len(sides)


def test_cache_capacity_holds_everything_that_fits():
    cfg = preset("OASIS").data                              # 160 x 224 x 192: 52.5 MiB per side
    assert cache_capacity(cfg, 395, 4096) == 78
    assert cache_capacity(cfg, 40, 4096) == 40
    assert cache_capacity(cfg, 395, 10) == 16
