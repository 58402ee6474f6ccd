"""The one oracle: every CPU kernel table against the reference network in float64, same weights.

Fields for inference and training, every parameter's gradient for training, in float32 and
(where the CPU has native bf16) in bf16 within stated tolerances; a reference changed in one
line (the activation) followed by every table; the switch that forces the reference.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import models.blocks
from models import build_model
from models.backend import KERNELS_ENV, backend_name, kernels_setting, select_kernels, use_kernels
from models.kernels import CpuInference, CpuTraining
from tests.helpers import needs_native_bf16
from utils.config import ModelConfig
from utils.spatial import warp

@pytest.fixture
def kernels_on():
    """The kernels where they apply, whatever ``PLCREG_KERNELS`` says (the suite may run with
    ``reference``): these tests compare them with the reference."""
    with use_kernels("auto"):
        yield


SMALL = dict(widths=(8, 16, 16, 32, 32), window_size=(2, 3, 2), num_heads=4)
VARIANTS = {"plain": {}, "released-compose": dict(released_compat=True, compose_levels=True)}


def _model_and_pair(seed=0, **options):
    """A small network whose flow heads give fields of a few voxels, and an odd-sized pair."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**SMALL, **options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head.weight" in name:
                p.normal_(0.0, 0.005)
    g = torch.Generator().manual_seed(3)
    return model, torch.rand(1, 1, 37, 45, 41, generator=g), torch.rand(1, 1, 37, 45, 41, generator=g)


def _field(model, moving, fixed, dtype=torch.float32, amp=None, grad=False):
    with torch.inference_mode(not grad), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        return model.to(dtype)(moving.to(dtype), fixed.to(dtype)).double()


def _float64_reference(model, moving, fixed, grad=False):
    return _field(copy.deepcopy(model), moving, fixed, torch.float64, grad=grad)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inference_kernels_give_the_float64_reference_field(variant, kernels_on):
    model, moving, fixed = _model_and_pair(**VARIANTS[variant])
    model.eval()
    assert isinstance(_table(model, moving, grad=False), CpuInference)
    ref = _float64_reference(model, moving, fixed)
    fast = _field(model, moving, fixed)
    assert ref.abs().max() > 1.0
    assert (fast - ref).abs().max() < 1e-4


@needs_native_bf16
def test_bf16_inference_kernels_within_tolerance_of_the_float64_reference(kernels_on):
    """Stated tolerance: mean 0.05 and max 0.25 voxel on fields of ~4 voxels (untrained weights
    amplify rounding more than trained ones)."""
    model, moving, fixed = _model_and_pair()
    model.eval()
    ref = _float64_reference(model, moving, fixed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _table(model, moving, grad=False).bf16
    diff = (_field(model, moving, fixed, amp=torch.bfloat16) - ref).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.25


def _table(model, x, grad):
    with torch.set_grad_enabled(grad):
        return select_kernels(x)


def _gradients(model, moving, fixed, dtype=torch.float32, amp=None):
    model = model.to(dtype).train()
    model.zero_grad()
    m, f = moving.to(dtype), fixed.to(dtype)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        u = model(m, f)
    (warp(m, u.to(dtype)) - f).square().mean().backward()
    return u.detach().double(), {name: p.grad.double() for name, p in model.named_parameters()}


def test_training_kernels_give_the_float64_reference_field_and_gradients(kernels_on):
    """Every parameter's float32 gradient within 3x the error of PyTorch's own float32 layers,
    whichever of their two memory layouts errs more. Float32 itself is off by up to ~15 % on
    some parameters here; the kernels' errors are the same on every CPU, while oneDNN's
    convolutions on an AVX2-only CPU err less in the default layout (its blocked format) than
    in channels-last, the layout that makes training fast: so the yardstick is both layouts.
    Biases just before an instance norm have no gradient in exact arithmetic and are left out."""
    model, moving, fixed = _model_and_pair()
    assert isinstance(_table(model, moving, grad=True), CpuTraining)
    u64, ref = _gradients(copy.deepcopy(model), moving, fixed, torch.float64)
    u, fast = _gradients(model, moving, fixed)
    assert (u - u64).abs().max() < 1e-4
    errors = []
    for channels_last in (False, True):
        plain = copy.deepcopy(model)
        if channels_last:
            for layer in plain.modules():
                if isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d)):
                    layer.register_forward_pre_hook(_channels_last_input)
        with use_kernels("reference"):
            errors.append(_gradients(plain, moving, fixed)[1])
    compared = 0
    for name, want in ref.items():
        if want.norm() < 1e-8:
            continue
        compared += 1
        yardstick = max((plain[name] - want).norm() for plain in errors) + 1e-4 * want.norm()
        assert (fast[name] - want).norm() < 3 * yardstick, name
    assert compared > 100


def _channels_last_input(layer, args):
    """A forward pre-hook: the layer's input in channels-last memory order."""
    return (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:])


@needs_native_bf16
def test_bf16_training_kernels_within_tolerance_of_the_float64_reference(kernels_on):
    """Stated tolerance: the field as in inference; gradients as close to float64 as the
    reference network's under the same bf16 autocast (bf16 gradients of these untrained weights
    are ~20 % off either way): each within 3x its error (plus 1 % of the norm), and the median
    within 1.5x."""
    model, moving, fixed = _model_and_pair()
    u64, ref = _gradients(copy.deepcopy(model), moving, fixed, torch.float64)
    with use_kernels("reference"):
        _, plain = _gradients(copy.deepcopy(model), moving, fixed, amp=torch.bfloat16)
    u, fast = _gradients(model, moving, fixed, amp=torch.bfloat16)
    diff = (u - u64).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.25
    ratios = []
    for name, want in ref.items():
        if want.norm() < 1e-8:
            continue
        yardstick = (plain[name] - want).norm() + 0.01 * want.norm()
        ratios.append(((fast[name] - want).norm() / yardstick).item())
        assert ratios[-1] < 3, name
    assert len(ratios) > 100 and sorted(ratios)[len(ratios) // 2] < 1.5


class _ConvolutionLayouts(TorchDispatchMode):
    """Records whether each convolution's input and incoming gradient are channels-last."""

    def __init__(self):
        super().__init__()
        self.layouts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # (how many leading tensor arguments to look at, where the "transposed" flag is)
        watched = {"convolution": (1, 6), "mkldnn_convolution": (1, None), "convolution_backward": (2, 7)}
        if name in watched:
            count, flag = watched[name]
            if flag is None or not args[flag]:
                for t in args[:count]:
                    if t.shape[1] > 1:
                        self.layouts.append((name, tuple(t.shape), t.is_contiguous(memory_format=torch.channels_last_3d)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amp", [None, pytest.param(torch.bfloat16, marks=needs_native_bf16)])
def test_training_kernels_keep_convolutions_channels_last(amp, kernels_on):
    """oneDNN's fast layout through a whole training step: inputs and gradients of every
    convolution (fields, norms, pooling and warped features would each fall back to the default
    layout if left to PyTorch), in float32 and under CPU bf16 autocast."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL)).train()
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with _ConvolutionLayouts() as record:
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            u = model(moving, fixed)
        (warp(moving, u.float()) - fixed).square().mean().backward()
    assert len(record.layouts) > 50
    assert [entry for entry in record.layouts if not entry[2]] == []


def test_another_activation_changes_one_line_and_every_table_follows(monkeypatch, kernels_on):
    """LeakyReLU in place of ReLU (the one line ``models.blocks.activation``): the fused
    norm+ReLU kernels decline it, so inference and training kernels still give the float64
    reference of the changed network, which differs from the ReLU network's."""
    monkeypatch.setattr(models.blocks, "activation", lambda: nn.LeakyReLU(0.2))
    model, moving, fixed = _model_and_pair()
    assert any(isinstance(m, nn.LeakyReLU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    ref = _float64_reference(model, moving, fixed)
    monkeypatch.undo()
    relu_model, _, _ = _model_and_pair()
    relu_model.load_state_dict(model.state_dict())
    assert (_float64_reference(relu_model, moving, fixed) - ref).abs().max() > 1e-3
    assert (_field(model.eval(), moving, fixed) - ref).abs().max() < 1e-4
    u64, grads64 = _gradients(copy.deepcopy(model), moving, fixed, torch.float64)
    u, grads = _gradients(model, moving, fixed)
    assert (u - u64).abs().max() < 1e-4
    head = "levels.0.fine_head.weight"
    assert (grads[head] - grads64[head]).norm() < 1e-3 * grads64[head].norm()


def test_kernels_setting_forces_the_reference(monkeypatch):
    x = torch.rand(1, 1, 8, 8, 8)
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert kernels_setting() == "auto" and select_kernels(x) is not None
    assert backend_name("cpu") == "cpu-kernels" and backend_name("cpu", training=True) == "cpu-kernels-training"
    with use_kernels("reference"):
        assert select_kernels(x) is None
    monkeypatch.setenv(KERNELS_ENV, "reference")
    assert select_kernels(x) is None and backend_name("cpu") == "reference"
    monkeypatch.setenv(KERNELS_ENV, "fastest")
    with pytest.raises(ValueError, match=KERNELS_ENV):
        select_kernels(x)
    monkeypatch.setenv(KERNELS_ENV, "auto")
    assert select_kernels(x.double()) is None                           # float64: the reference
    with torch.autocast("cpu", dtype=torch.float16):
        assert select_kernels(x) is None                                # float16 autocast: the reference
    assert backend_name("cuda") == "reference"


def test_bf16_autocast_without_native_bf16_runs_the_reference(monkeypatch):
    monkeypatch.setenv("PLCREG_CPU_BF16", "0")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert select_kernels(torch.rand(1, 1, 8, 8, 8)) is None
    assert backend_name("cpu", torch.bfloat16) == "reference"
