"""What this machine's hardware can do, asked by both paths: serving (`core.serving.engine` picks SERVE_PRECISION) and
training (`trainer.train` picks its precision). A module of its own so the trainer never loads the engine for a
CPU probe."""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slower than fp32.
    torch only exposes this check privately; a torch without it is treated as "no"."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
