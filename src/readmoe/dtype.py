"""Which floating-point type models run in: `--dtype auto|float32|bfloat16|float16`.

`auto` picks bf16 where the hardware multiplies it natively (CUDA GPUs with bf16 support, CPUs with
AMX-BF16 or AVX512-BF16 units, where batched matmuls run about 1.5x faster than fp32) and fp32
elsewhere, where bf16 would be emulated and slower. Statistics, losses, sampling and optimizer
state stay fp32 whatever the model's dtype.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
HELP = "auto (bf16 on CUDA and on CPUs with bf16 matrix units, else fp32), float32, bfloat16 or float16"


@lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """AMX-BF16 or AVX512-BF16, from the kernel's CPU flags (Linux); False where they cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype for a `--dtype` value on `device` (default: CUDA when present, else CPU)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_bf16_units() else torch.float32


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
