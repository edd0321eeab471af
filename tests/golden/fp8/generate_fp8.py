#!/usr/bin/env python3
# Golden values for FP8 E4M3 (OCP E4M3FN) from PyTorch's `float8_e4m3fn` conversion, and block
# quantization as DeepSeek-V3's reference kernels define it (amax clamped to 1e-4, scale =
# amax / 448, optionally rounded up to a power of two: UE8M0), on ragged shapes.
#   python tests/golden/fp8/generate_fp8.py   ->  tests/golden/fp8/e4m3.safetensors
import os

import torch
from safetensors.torch import save_file

def block_quant(w, br, bc, ue8m0):
    rows, cols = w.shape
    gr, gc = -(-rows // br), -(-cols // bc)
    scales = torch.empty(gr, gc)
    q = torch.empty(rows, cols, dtype=torch.uint8)
    for i in range(gr):
        for j in range(gc):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            amax = blk.abs().max().clamp(min=1e-4)
            s = amax / 448.0
            if ue8m0:
                s = torch.exp2(torch.ceil(torch.log2(s)))
            scales[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / s).to(torch.float8_e4m3fn).view(torch.uint8)
    return q, scales


def main():
    torch.manual_seed(0)
    out = {}

    # Every code, decoded.
    codes = torch.arange(256, dtype=torch.uint8)
    out["all_codes_decoded"] = codes.view(torch.float8_e4m3fn).float()

    # Random f32 inputs over the whole range: normals, subnormals, beyond 448, exact ties, specials.
    parts = [
        torch.randn(4000) * 10.0,
        torch.randn(2000) * 300.0,                                  # many beyond ±448
        (torch.rand(2000) * 2 - 1) * 2.0 ** -6,                    # subnormal range of E4M3
        (torch.rand(1000) * 2 - 1) * 2.0 ** -12,                   # below the smallest subnormal
        torch.exp2(torch.randint(-12, 10, (1000,)).float()) * (1 + torch.randint(0, 16, (1000,)).float() / 16),  # ties
        torch.tensor([0.0, -0.0, 448.0, -448.0, 464.0, 480.0, 1e30, -1e30, float("inf"), float("-inf"),
                      float("nan"), -float("nan"), 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 1.0e-45]),
    ]
    x = torch.cat(parts).float()
    out["random_in"] = x
    out["random_codes"] = x.to(torch.float8_e4m3fn).view(torch.uint8)


    # A weight with ragged 128x128 blocks and an outlier, and activations in 1x128 tiles.
    w = torch.randn(130, 200)
    w[5, 7] = 900.0
    w[129, 199] = -0.001
    out["weight_in"] = w
    for fmt, ue in (("f32", False), ("ue8m0", True)):
        q, s = block_quant(w, 128, 128, ue)
        out[f"weight_codes_{fmt}"] = q
        out[f"weight_scales_{fmt}"] = s
    a = torch.randn(3, 300) * 4
    a[1] = 0.0  # an all-zero row: the 1e-4 clamp keeps the scale finite
    out["act_in"] = a
    for fmt, ue in (("f32", False), ("ue8m0", True)):
        q, s = block_quant(a, 1, 128, ue)
        out[f"act_codes_{fmt}"] = q
        out[f"act_scales_{fmt}"] = s

    path = os.path.join(os.path.dirname(__file__), "e4m3.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"torch": torch.__version__})
    print(f"wrote {path} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
