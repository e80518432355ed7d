"""Weights prepacked into oneDNN's blocked layout, for bf16 matmuls on CPU cores with bf16 matrix units.

`F.linear` on a plain bf16 weight makes oneDNN reorder the weight into its blocked layout on every call;
at serving batch sizes that reorder costs as much as the matmul. Packing once, when the engine starts,
removes it: measured here, a 3072 x 576 bf16 projection takes 206 µs instead of 396 at 1 row and 218
instead of 568 at 16 rows, with bit-identical results. This is what IPEX and inductor's freezing pass do;
the ops are torch's own (`torch.ops.mkldnn`). fp32 gains little (mkl's packing helps one row only), so
only bf16 (and fp16) is packed.

The packed copy is extra memory where the plain weight stays referenced (attention, lm_head, the shared
expert), so `auto` packs only when that copy is small against the memory available: the 135M demo model
packs, a 7B parent at capacity 2 on a 24 GiB machine does not.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import UserError

PackMode = bool | Literal["auto"]
PACKED_DTYPES = (torch.bfloat16, torch.float16)
AUTO_MEMORY_FRACTION = 0.1  # auto packs when the packed copy is at most this share of the available memory


class PackedLinear:
    """A linear layer's weight (and bias) in oneDNN's blocked layout; call it like `F.linear(x, weight, bias)`."""

    __slots__ = ("weight", "bias", "shape")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_hint: int = 16):
        self.shape = tuple(weight.shape)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a plain weight tensor, or a callable projection (a PackedLinear, the step runner's Projection)."""
    return w(x) if callable(w) else F.linear(x, w)


def pack(w: torch.Tensor) -> PackedLinear | torch.Tensor:
    """`w` prepacked; an empty weight (an expert with no neurons in this layer) stays as it is: oneDNN has no
    primitive for it, and the runner skips it."""
    return PackedLinear(w) if w.numel() else w


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16/fp16 on a CPU whose oneDNN has the kernels (bf16 matrix units or AVX-512 bf16)."""
    if device.type != "cpu" or dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    check = ops._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported
    return bool(check())


def available_bytes() -> int:
    import psutil  # accelerate's dependency

    return psutil.virtual_memory().available


def resolve_packing(mode: PackMode, device: torch.device, dtype: torch.dtype, extra_bytes: int) -> tuple[bool, str]:
    """(pack?, why) for the engine; `extra_bytes` is what the packed copies add to memory."""
    if mode not in (True, False, "auto"):
        raise UserError(f"pack_weights must be auto, on or off, not '{mode}'")
    ok = supported(device, dtype)
    if mode is True and not ok:
        raise UserError(f"packing weights (--pack-weights on) needs bf16 or fp16 weights on a CPU with oneDNN's bf16/fp16 kernels "
                        f"(here: {dtype} on {device.type}); use auto or off")
    if mode != "auto":
        return bool(mode), "set explicitly"
    if not ok:
        return False, f"auto: only bf16/fp16 on CPU cores gains from prepacking ({dtype} on {device.type})"
    avail = available_bytes()
    if extra_bytes > AUTO_MEMORY_FRACTION * avail:
        return False, (f"auto: the packed copy ({extra_bytes / 2**30:.1f} GiB) is over "
                       f"{AUTO_MEMORY_FRACTION:.0%} of the available memory ({avail / 2**30:.1f} GiB)")
    return True, f"auto: bf16 on CPU cores; the packed copy takes {extra_bytes / 2**20:.0f} MiB"
