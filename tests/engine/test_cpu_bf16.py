"""bf16 mixed precision on the CPU: close to float32, identical label sets, and a float32
fallback (the same field) on a CPU without native bf16."""
import numpy as np
import pytest
import torch

import engine.runtime as runtime
from engine.infer import register_tensors
from models import build_model
from models.kernels.ops import instance_norm_relu_
from tests.helpers import needs_native_bf16, synthetic_pair
from utils.config import ModelConfig, RunConfig
from utils.spatial import warp_labels


def _model_and_pair():
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=(8, 16, 16, 32, 32), window_size=(2, 3, 2), num_heads=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head.weight" in name:
                p.normal_(0.0, 0.005)             # fields of a few voxels
    return model, synthetic_pair((48, 48, 48), amplitude=3.0, seed=2)


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native_bf16), False])
def test_bf16_field_is_close_to_float32_and_keeps_label_sets(native, monkeypatch):
    # the bf16 kernels where the CPU has native bf16; everywhere, autocast bf16 of the
    # reference network (emulated where not native)
    if not native:
        monkeypatch.setenv("PLCREG_CPU_BF16", "0")
    model, (moving, fixed, mlab, _) = _model_and_pair()
    with torch.inference_mode():
        u32 = model(moving, fixed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u16 = model(moving, fixed)
    assert u16.dtype == torch.float32 and u32.abs().max().item() > 2.0
    diff = (u16 - u32).abs()
    # stated tolerance: mean 0.05 and max 0.25 voxel on fields of ~4 voxels (untrained weights
    # amplify rounding more than trained ones)
    assert diff.mean().item() < 0.05 and diff.max().item() < 0.25
    labels16, labels32 = warp_labels(mlab, u16), warp_labels(mlab, u32)
    assert set(np.unique(labels16.numpy())) == set(np.unique(labels32.numpy()))
    agree = (labels16 == labels32).float().mean().item()
    assert agree > 0.98


def test_bf16_instance_norm_matches_float64():
    x = torch.randn(1, 6, 20, 18, 16, dtype=torch.float64) * 2 + 0.5
    ref = torch.relu(torch.nn.functional.instance_norm(x, eps=1e-5))
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        out = instance_norm_relu_(x.to(torch.bfloat16).contiguous(memory_format=layout))
        assert out.dtype == torch.bfloat16 and torch.allclose(out.double(), ref, atol=0.03)
    two = torch.cat([x, -x]).to(torch.bfloat16)
    out = instance_norm_relu_(two)
    ref2 = torch.relu(torch.nn.functional.instance_norm(torch.cat([x, -x]), eps=1e-5))
    assert torch.allclose(out.double(), ref2, atol=0.03)


def test_amp_on_a_cpu_without_native_bf16_falls_back_to_float32(monkeypatch, capsys):
    model, (moving, fixed, _, _) = _model_and_pair()
    run = RunConfig()
    run.eval.amp = True
    monkeypatch.setenv("PLCREG_CPU_BF16", "0")
    monkeypatch.setattr(runtime, "_warned", set())
    assert runtime.amp_dtype(torch.device("cpu"), True) is None
    assert "no native bf16" in capsys.readouterr().err
    u_amp, _ = register_tensors(model, run, moving, fixed)
    run.eval.amp = False
    u_fp32, _ = register_tensors(model, run, moving, fixed)
    assert torch.equal(u_amp, u_fp32)
    assert runtime.precision_name(torch.bfloat16) == "bf16" and runtime.precision_name(None) == "fp32"


@needs_native_bf16
def test_native_bf16_detected_and_used_by_amp():
    assert runtime.amp_dtype(torch.device("cpu"), True) == torch.bfloat16


def test_bf16_under_torch_compile_is_one_graph_close_to_float32():
    """``eval.compile`` with ``eval.amp``: the network traces as one graph under CPU bf16 autocast
    (run here by dynamo's eager backend, which skips code generation) and stays within the bf16
    tolerance of the float32 field."""
    model, (moving, fixed, _, _) = _model_and_pair()
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            u32 = model(moving, fixed)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                explanation = torch._dynamo.explain(model)(moving, fixed)
                u16 = torch.compile(model, backend="eager", dynamic=False)(moving, fixed)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    diff = (u16 - u32).abs()
    assert u16.dtype == torch.float32 and diff.mean().item() < 0.05 and diff.max().item() < 0.25
