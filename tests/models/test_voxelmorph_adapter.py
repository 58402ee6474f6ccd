"""The VoxelMorph baseline adapter (skipped when the optional package is absent)."""
import pytest
import torch

from models import build_model, default_config, load_model, save_model
from tests.helpers import smooth_image
from utils.spatial import warp

vxm = pytest.importorskip("voxelmorph")


def _model():
    torch.manual_seed(0)
    return build_model(default_config("voxelmorph")).eval()


def test_constant_translation_is_in_the_project_convention():
    """A flow head that outputs +2 voxels along H: our warp of the adapter's field equals
    VoxelMorph's own warped source, and content moves by -2 along H."""
    model = _model()
    head = model.net.flow_layer
    conv = head if isinstance(head, torch.nn.Conv3d) else next(m for m in head.modules() if isinstance(m, torch.nn.Conv3d))
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
    moving, fixed = smooth_image((32, 32, 32), seed=1), smooth_image((32, 32, 32), seed=2)
    with torch.no_grad():
        u = model(moving, fixed)
        _, theirs = model.net(moving, fixed, return_warped_source=True)
    assert torch.allclose(u, torch.tensor([0.0, 2.0, 0.0]).view(1, 3, 1, 1, 1).expand_as(u), atol=1e-6)
    ours = warp(moving, u)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours[0, 0, :, 10:20], moving[0, 0, :, 12:22], atol=1e-6)


def test_odd_size_padded_and_cropped_and_checkpoint_round_trip(tmp_path):
    model = _model()
    x = smooth_image((19, 23, 21), seed=3)
    with torch.no_grad():
        u = model(x, x)
    assert u.shape == (1, 3, 19, 23, 21)
    path = save_model(tmp_path / "vxm.pth", model)
    again, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(again.eval()(x, x), u)
