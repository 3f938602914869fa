"""Benchmark: PyTorch's fused attention kernels on Stable Diffusion 1.5's attention shapes.

    python bench/attention.py --out attention.json      # GPU (on a CPU it reports what runs there)

SD 1.5's UNet has 16 transformer blocks, each with a self-attention and a cross-attention (77 text
tokens), at four sizes of latent (64, 32, 16, 8 pixels a side at 512 px) with 8 heads of 40, 80, 160
and 160 channels. Each kernel (cuDNN, flash, memory-efficient, math) is timed alone on every shape,
forward and forward + backward, in bf16. Then every priority order of the fused kernels is scored by
what the UNet would spend with it (a call the first kernel cannot run falls through to the next), and
the best order for inference and for training is printed: `evalsuite.models.CUDA_ATTENTION_ORDER`
takes the inference one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (query tokens, key tokens, head width, blocks at this size) for SD 1.5 at 512 px
SHAPES = [(4096, 4096, 40, 5), (4096, 77, 40, 5), (1024, 1024, 80, 5), (1024, 77, 80, 5),
          (256, 256, 160, 5), (256, 77, 160, 5), (64, 64, 160, 1), (64, 77, 160, 1)]
FUSED = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
PYTORCH_ORDER = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")  # its default priority


def time_call(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def measure(backend: str, batch: int, lq: int, lk: int, d: int, backward: bool, device: str,
            dtype: torch.dtype, reps: int) -> float:
    """Seconds per call, or inf where the kernel cannot run this shape."""
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(batch, 8, lq, d, device=device, dtype=dtype, generator=g, requires_grad=backward)
    k = torch.randn(batch, 8, lk, d, device=device, dtype=dtype, generator=g, requires_grad=backward)
    v = torch.randn(batch, 8, lk, d, device=device, dtype=dtype, generator=g, requires_grad=backward)

    def call() -> None:
        out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            out.backward(torch.ones_like(out))

    try:
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return time_call(call, reps)
    except RuntimeError:
        return float("inf")


def unet_time(times: dict[str, list[float]], order: tuple[str, ...]) -> float:
    """Attention seconds of one UNet call with this priority order (math is the last resort)."""
    total = 0.0
    for i, (*_, count) in enumerate(SHAPES):
        total += count * next((times[b][i] for b in (*order, "MATH") if times[b][i] < float("inf")), float("inf"))
    return total


def best_order(times: dict[str, list[float]]) -> tuple[list[str], float]:
    """The priority order of the fused kernels with the least UNet attention time."""
    total, order = min((unet_time(times, order), order) for order in itertools.permutations(FUSED))
    if total > 0.97 * unet_time(times, PYTORCH_ORDER):  # not worth leaving PyTorch's own order for
        return list(PYTORCH_ORDER), unet_time(times, PYTORCH_ORDER)
    return list(order), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="UNet batch (images x 2 under guidance)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = a.batch if device == "cuda" else 2
    r: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "batch": batch, "dtype": str(dtype), "shapes": SHAPES}
    for mode in ("forward", "backward"):
        times = {b: [measure(b, batch, lq, lk, d, mode == "backward", device, dtype, a.reps)
                     for lq, lk, d, _ in SHAPES] for b in (*FUSED, "MATH")}
        order, total = best_order(times)
        r[mode] = {"ms": {b: [round(1e3 * t, 3) if t < float("inf") else None for t in ts] for b, ts in times.items()},
                   "best_order": order, "unet_attention_ms": round(1e3 * total, 2),
                   "pytorch_order_ms": round(1e3 * unet_time(times, PYTORCH_ORDER), 2)}
        print(json.dumps({mode: r[mode]}), flush=True)
    if a.out:
        a.out.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
