"""Check the released-compatible mode against the released PLCReg code itself.

    python scripts/check_released_equivalence.py --released-code ../PLCReg --size 80 112 96

Builds the released network from a checkout of the authors' repository (its ``Model/``
folder; needs ``einops`` and ``ml_collections``; ``timm`` is replaced by three small
stand-ins when it is missing), gives it random weights, converts them with
``models.released`` and runs both networks on the same random pair. Prints the largest
differences of the fields and of the warped images (the released ``SpatialTransformer``
against our ``warp`` of the released-compatible field), in float32 and float64.
Nothing of the released code is copied: it is imported from the given folder.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.released_code import released_network, released_spatial_transformer  # noqa: E402
from models import build_model  # noqa: E402
from models.released import convert_released_state, infer_config  # noqa: E402
from utils.spatial import released_sampling_field, warp  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--released-code", type=Path, required=True, help="checkout of the released repository")
    p.add_argument("--size", type=int, nargs=3, default=[80, 112, 96])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-std", type=float, default=1e-2,
                   help="std of the flow heads' random weights (the rest keeps the released constructor's "
                        "initialisation, drawn with --seed); 1e-2 gives fields of a few voxels")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    net = released_network(args.released_code, args.size).eval()
    with torch.no_grad():                      # the constructor's random weights; flow heads of a useful scale
        for name, t in net.state_dict().items():
            if "reghead" in name or "attn.power" in name or "attn.scale" in name or "positional" in name:
                t.copy_(args.head_std * torch.randn_like(t) if "reghead" in name else 0.5 * torch.randn_like(t))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    config = infer_config(state)
    ours = build_model(config).eval()
    converted, dropped = convert_released_state(state, ours)
    ours.load_state_dict(converted, strict=True)
    moving, fixed = torch.rand(1, 1, *args.size), torch.rand(1, 1, *args.size)
    print(f"released parameters {sum(t.numel() for t in state.values()):,}, ours "
          f"{sum(p.numel() for p in ours.parameters()):,} ({len(dropped)} unused tensors dropped)")
    print("| precision | max abs field (voxels) | mean abs field | max |Δu| | max |Δ warped image| | max |image| |")
    print("|---|---|---|---|---|---|")
    fields = {}
    for dtype in (torch.float64, torch.float32):
        net.to(dtype), ours.to(dtype)
        m, f = moving.to(dtype), fixed.to(dtype)
        with torch.no_grad():
            u_rel = net(m, f)
            u_ours = ours(m, f)
            stn = released_spatial_transformer(args.size).to(dtype)
            stn.grid = stn.grid.to(dtype)
            warped_rel = stn(m, u_rel)
            warped_ours = warp(m, u_ours)
        fields[dtype] = u_rel.double()
        du = (released_sampling_field(u_rel) - u_ours).abs().max().item()
        dw = (warped_rel - warped_ours).abs().max().item()
        print(f"| {str(dtype).split('.')[-1]} | {u_rel.abs().max().item():.3f} | {u_rel.abs().mean().item():.3f} | "
              f"{du:.3g} | {dw:.3g} | {warped_rel.abs().max().item():.3f} |")
    noise = (fields[torch.float32] - fields[torch.float64]).abs().max().item()
    print(f"float32 rounding of the released code itself (its float32 vs its float64 field): max {noise:.3g} voxels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
