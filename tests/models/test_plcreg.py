"""The full network: shapes at awkward sizes, gradients, options, checkpoints and real learning."""

import numpy as np
import pytest
import torch

from models import build_model, load_model, save_model
from models.plcreg import EstimatorLevel
from engine.runtime import compile_model
from tests.helpers import synthetic_pair
from utils.checkpoint import CheckpointError
from utils.config import ModelConfig
from utils.losses import grad_loss, ncc_loss
from utils.metrics import dice_per_label
from utils.spatial import integrate_velocity, warp, warp_labels

SMALL = dict(widths=(8, 16, 16, 32, 32), window_size=(2, 3, 2), num_heads=4)


def _pair(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *size, generator=g), torch.rand(1, 1, *size, generator=g)


@pytest.mark.parametrize("size", [(40, 48, 40), (37, 45, 41)])
def test_default_network_output_shape_and_near_zero_start(size):
    model = build_model().eval()
    with torch.inference_mode():
        u, levels = model(*_pair(size), return_levels=True)
    assert u.shape == (1, 3, *size)
    assert torch.isfinite(u).all()
    assert u.abs().max().item() < 0.5
    padded = [max(32, -(-n // 16) * 16) for n in size]
    assert [tuple(f.shape[2:]) for f in levels] == [tuple(p // 2 ** (4 - i) for p in padded) for i in range(5)]


def test_parameter_count_close_to_released_network():
    n = sum(p.numel() for p in build_model().parameters())
    assert abs(n - 16.39e6) / 16.39e6 < 0.01


def _loss(model, moving, fixed):
    u = model(moving, fixed)
    return ncc_loss(warp(moving, u), fixed, win=5) + grad_loss(u)


def test_backward_reaches_every_parameter_and_freezing_stops_encoder():
    moving, fixed = _pair((24, 24, 24))
    model = build_model(ModelConfig(**SMALL))
    _loss(model, moving, fixed).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert nonzero / len(list(model.parameters())) > 0.95

    frozen = build_model(ModelConfig(**SMALL, freeze_encoder=True))
    _loss(frozen, moving, fixed).backward()
    assert all(p.grad is None for p in frozen.encoder.parameters())
    assert all(p.grad is not None for n, p in frozen.named_parameters() if not n.startswith("encoder."))


def test_gradient_checkpointing_gives_same_output_and_gradients():
    moving, fixed = _pair((24, 24, 24), seed=1)
    torch.manual_seed(3)
    plain = build_model(ModelConfig(**SMALL)).double()
    ckpt = build_model(ModelConfig(**SMALL, grad_checkpointing=True)).double()
    ckpt.load_state_dict(plain.state_dict())
    moving, fixed = moving.double(), fixed.double()
    l1, l2 = _loss(plain, moving, fixed), _loss(ckpt, moving, fixed)
    l1.backward()
    l2.backward()
    assert torch.allclose(l1, l2, atol=1e-12)
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-12), n


def test_diffeomorphic_option_integrates_the_additive_output():
    moving, fixed = _pair((32, 32, 32), seed=2)
    plain = build_model(ModelConfig(**SMALL)).double().eval()
    with torch.no_grad():   # a large, spatially varying field, so that integration matters
        plain.levels[0].fine_head.weight.normal_(0.0, 0.2)
        plain.levels[0].fine_head.bias.copy_(torch.tensor([1.5, -1.0, 0.5]))
    diff = build_model(ModelConfig(**SMALL, diffeomorphic=True, int_steps=5)).double().eval()
    diff.load_state_dict(plain.state_dict())
    with torch.no_grad():
        v = plain(moving.double(), fixed.double())
        u = diff(moving.double(), fixed.double())
    assert torch.allclose(u, integrate_velocity(v, 5), atol=1e-10)
    assert not torch.allclose(u, v, atol=1e-3)


def test_compose_levels_composes_residual_with_coarse_field():
    """With a constant residual c and a linear coarse field B x: composition gives c + B (x + c),
    addition gives c + B x."""
    c = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    B = torch.tensor([[0.1, 0.0, -0.05], [0.02, 0.1, 0.0], [0.0, -0.04, 0.08]], dtype=torch.float64)
    size = (12, 12, 12)
    x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in size], indexing="ij"))
    base = torch.einsum("ij,j...->i...", B, x)[None]
    feats = torch.rand(1, 4, *size, dtype=torch.float64)
    out = {}
    for compose in (False, True):
        level = EstimatorLevel(4, None, None, compose).double()
        with torch.no_grad():
            level.head.weight.zero_()
            level.head.bias.copy_(c)
        out[compose], _ = level(feats, feats, base, None)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    expect_add = c.view(1, 3, 1, 1, 1) + base
    expect_comp = expect_add + torch.einsum("ij,j->i", B, c).view(1, 3, 1, 1, 1)
    assert torch.allclose(out[False], expect_add, atol=1e-12)
    assert torch.allclose(out[True][inner], expect_comp[inner], atol=1e-10)


def test_checkpoint_round_trip_and_refusals(tmp_path):
    moving, fixed = _pair((32, 32, 32), seed=4)
    model = build_model(ModelConfig(**SMALL)).eval()
    path = save_model(tmp_path / "ckpt.pth", model, epoch=3)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]      # no temp file left behind
    loaded, ckpt = load_model(path)
    assert ckpt["epoch"] == 3 and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(moving, fixed), model(moving, fixed))
    # a network of another architecture refuses it, naming the differing field
    from models import load_weights
    other = build_model(ModelConfig(**{**SMALL, "widths": (8, 16, 16, 32, 64)}))
    with pytest.raises(CheckpointError, match="widths"):
        load_weights(other, ckpt, str(path))
    # tampered weights
    bad = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if "positional" not in k})
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(model, bad)
    name = "levels.1.attention.attn.power"
    nan = dict(ckpt, model={**ckpt["model"], name: torch.full_like(ckpt["model"][name], float("nan"))})
    with pytest.raises(CheckpointError, match=rf"not finite.*{name}"):
        load_weights(model, nan, str(path))
    # corrupt and foreign files
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_model(tmp_path / "corrupt.pth")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a PLCReg checkpoint"):
        load_model(tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.pth")


def test_state_dict_holds_only_weights():
    model = build_model(ModelConfig(**SMALL))
    model(*_pair((16, 16, 16)))   # fills the warping grid buffer; a 16^3 input is padded to 32^3
    names = set(model.state_dict())
    assert names == {n for n, _ in model.named_parameters()}


def test_bad_inputs_rejected():
    model = build_model(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="moving and fixed"):
        model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 17))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        model(torch.rand(1, 2, 16, 16, 16), torch.rand(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(widths=(8, 12, 16, 32, 32), num_heads=4)
    for alpha in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="alpha"):
            ModelConfig(alpha=alpha)


def test_network_learns_a_synthetic_pair():
    """60 CPU steps on one generated pair (both directions as a batch of 2) at the paper's
    learning rate: NCC falls and label Dice rises well above identity."""
    torch.manual_seed(0)
    moving, fixed, mlab, flab = synthetic_pair((32, 32, 32), amplitude=4.0, seed=5)
    model = build_model(ModelConfig(**SMALL))
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    labels = np.unique(flab.numpy())[1:]
    start_ncc = ncc_loss(moving, fixed).item()
    start_dice = np.nanmean(dice_per_label(mlab, flab, labels))
    both_moving, both_fixed = torch.cat([moving, fixed]), torch.cat([fixed, moving])
    for _ in range(60):
        opt.zero_grad()
        u = model(both_moving, both_fixed)
        loss = ncc_loss(warp(both_moving, u), both_fixed) + 1.0 * grad_loss(u)
        loss.backward()
        opt.step()
    with torch.no_grad():
        u = model(moving, fixed)
        end_ncc = ncc_loss(warp(moving, u), fixed).item()
    end_dice = np.nanmean(dice_per_label(warp_labels(mlab, u), flab, labels))
    assert end_ncc < start_ncc - 0.1
    assert end_dice > start_dice + 0.07


def _model_pair_and_plain_field():
    """A small network whose flow heads give fields of a few voxels, an odd-sized pair, and
    the field of the autograd (plain) path."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head.weight" in name:
                p.normal_(0.0, 0.005)
    moving, fixed = _pair((37, 45, 41), seed=3)
    with torch.enable_grad():
        plain = model(moving, fixed)
    return model, moving, fixed, plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_field():
    """On a GPU (cuDNN convolutions, CUDA sampling and attention, TF32 off) the network gives
    the field of the CPU's autograd path and of its inference path, on a pair of odd size."""
    model, moving, fixed, plain = _model_pair_and_plain_field()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model.cuda()
        with torch.inference_mode():
            fast = model(moving.cuda(), fixed.cuda()).cpu()
        with torch.enable_grad():
            autograd = model(moving.cuda(), fixed.cuda()).detach().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.cpu()
    assert plain.abs().max().item() > 1.0
    assert (fast - plain).abs().max().item() < 1e-3
    assert (autograd - plain).abs().max().item() < 1e-3


def test_compiled_network_matches_the_plain_path():
    """torch.compile (engine.runtime.compile_model) traces the reference network as one graph
    and gives the eager field (|du| < 1e-4). Compiled kernels land in torch's own cache (keyed
    by graph and source), so only the first run on a machine pays for compiling them."""
    model, moving, fixed, plain = _model_pair_and_plain_field()
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(moving, fixed)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    keys = set(model.state_dict())
    compile_model(model)
    with torch.inference_mode():
        compiled = model(moving, fixed)
        again = model(moving, fixed)
    torch._dynamo.reset()
    assert set(model.state_dict()) == keys                  # checkpoints unchanged by compiling
    assert plain.abs().max().item() > 1.0
    assert (compiled - plain).abs().max().item() < 1e-4
    assert torch.equal(compiled, again)
