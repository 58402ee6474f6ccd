"""The demo generator: invertible deformations, labels that move with images, seeded, OASIS layout."""
import numpy as np
from scipy import ndimage

from utils.config import preset
from utils.datasets import discover
from utils.demo_data import DEMO_LABELS, DemoSettings, load_template, make_subject, write_demo_dataset
from utils.metrics import dice_per_label, jacobian_stats


def test_template_is_embedded_with_twenty_structures():
    t1, labels, affine = load_template()
    assert t1.shape == labels.shape == (80, 96, 80) and 0 <= t1.min() and t1.max() == 1
    assert set(np.unique(labels)) == {0, *DEMO_LABELS}
    assert np.allclose(np.abs(np.diag(affine)[:3]), 2.0)


def test_subject_deformation_is_invertible_and_labels_follow_image():
    t1, labels, _ = load_template(downsample=2)
    img, lab, u = make_subject(t1, labels, seed=3, settings=DemoSettings(downsample=2))
    assert jacobian_stats(u)["pct_nonpos_jac"] == 0.0
    # independent reference: template labels sampled at x + u(x) by scipy (nearest)
    coords = np.indices(labels.shape) + u[0].numpy().astype(np.float64)
    ref = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    assert np.nanmean(dice_per_label(lab, ref, DEMO_LABELS)) > 0.999
    # the image moved the same way: warped template intensities agree inside the brain
    ref_img = ndimage.map_coordinates(t1.astype(np.float64), coords, order=1, mode="constant")
    inside = lab > 0
    assert np.corrcoef(img[inside], ref_img[inside])[0, 1] > 0.9
    # and the subject differs from the template
    assert np.nanmean(dice_per_label(lab, labels, DEMO_LABELS)) < 0.9


def test_generator_is_seeded():
    t1, labels, _ = load_template(downsample=2)
    s = DemoSettings(downsample=2)
    a, b, c = make_subject(t1, labels, 5, s), make_subject(t1, labels, 5, s), make_subject(t1, labels, 6, s)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_demo_dataset_in_oasis_layout(tmp_path):
    root = write_demo_dataset(tmp_path / "demo", n_train=2, n_test=1, settings=DemoSettings(downsample=2))
    cfg = preset("OASIS").data
    cfg.root, cfg.labels, cfg.val_subjects = str(root), DEMO_LABELS, 0
    idx = discover(cfg)
    assert len(idx.train) == 2 and len(idx.test) == 1 and idx.atlas is not None


def test_demo_preset_scores_the_generated_labels():
    assert preset("Demo").data.labels == DEMO_LABELS
