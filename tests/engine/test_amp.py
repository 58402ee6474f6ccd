"""Mixed precision on CUDA (skipped without a GPU): fp32 fields and losses, AMP close to fp32."""
import pytest
import torch

from engine.infer import register_tensors
from engine.train import Trainer
from models import build_model
from tests.helpers import synthetic_pair
from tests.layouts import quick_overrides, write_oasis
from utils.config import ModelConfig, RunConfig, apply_override, preset
from utils.spatial import warp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP needs CUDA")


def test_amp_inference_is_float32_and_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=(8, 16, 32, 64, 128), window_size=(2, 2, 2))).cuda().eval()
    moving, fixed, _, _ = (t.cuda() for t in synthetic_pair((64, 64, 64), seed=1))
    run = RunConfig()
    u32, _ = register_tensors(model, run, moving, fixed)
    run.eval.amp = True
    u16, _ = register_tensors(model, run, moving, fixed)
    assert u16.dtype == torch.float32 and warp(moving, u16).dtype == torch.float32
    assert (u16 - u32).abs().max().item() < 0.05 * max(1.0, u32.abs().max().item())


def test_amp_training_step_keeps_losses_in_float32(tmp_path):
    root = write_oasis(tmp_path / "OASIS", n_train=4, n_test=1)
    run = preset("OASIS")
    for o in quick_overrides("OASIS"):
        apply_override(run, o)
    run.data.root, run.checkpoint_dir, run.device = str(root), str(tmp_path / "ck"), "cuda"
    run.train.amp, run.train.epochs = True, 1
    trainer = Trainer(run, progress=False)
    assert trainer.amp in (torch.bfloat16, torch.float16)
    loss, _ = trainer.loss_of(trainer._batch(trainer.items[0][:1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert trainer.train_step(trainer.items[0][:1]) is not None
