"""How far HRNet's output moves from float64 when every conv's operands are cut to TF32 (10 mantissa
bits): truncated, as Triton's `tf32` dot does, or rounded to nearest (ties away), as cuDNN's TF32
convolutions and the Triton backend's `tf32_rna` (hrnet_fast/triton/_common.py) do. Products and sums
stay in float64, so only the operand rounding differs; runs on the CPU in a few seconds.

    .venv/bin/python benchmarks/sim_tf32_rounding.py [--model w32] [--seeds 3]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hrnet_fast.bench.model import PRESETS, build_model, randomize


def to_tf32(t: torch.Tensor, mode: str) -> torch.Tensor:
    """t (float64) through float32, then TF32 by `mode` ("trunc" or "rna"), back in float64."""
    bits = t.float().contiguous().view(torch.int32)
    bits = bits & -0x2000 if mode == "trunc" else (bits + 0x1000) & -0x2000
    return bits.view(torch.float32).double()


def run(model: torch.nn.Module, x: torch.Tensor, mode: str | None) -> torch.Tensor:
    conv2d = F.conv2d

    def rounded(inp, w, *args, **kwargs):
        return conv2d(to_tf32(inp, mode), to_tf32(w, mode), *args, **kwargs)

    F.conv2d = rounded if mode else conv2d  # nn.Conv2d calls F.conv2d through the module attribute
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        F.conv2d = conv2d
    return out[0] if isinstance(out, (list, tuple)) else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="w32", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    size = PRESETS[args.model][2]
    print(f"{args.model} {size[0]}x{size[1]}: max |out - float64| / max |float64|")
    for seed in range(args.seeds):
        model = randomize(build_model(args.model), size, seed).double()
        x = torch.randn(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        ref = run(model, x, None)
        scale = ref.abs().max().item()
        errs = {mode: (run(model, x, mode) - ref).abs().max().item() / scale for mode in ("trunc", "rna")}
        print(f"  seed {seed}: truncated {errs['trunc']:.2e}, rounded to nearest {errs['rna']:.2e} "
              f"({errs['trunc'] / errs['rna']:.1f}x)")


if __name__ == "__main__":
    main()
