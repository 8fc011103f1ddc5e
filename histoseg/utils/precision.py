"""``trainer.precision: auto``: the fastest safe precision for the machine the run lands on.

bf16 autocast is about 2x faster than float32 on CPUs whose oneDNN has bf16 kernels (AVX-512 BW/VL/DQ,
AVX512-BF16, AMX). On a CPU without them (e.g. an AVX2-only AMD EPYC) PyTorch runs bf16 convolutions and
matmuls on a reference path: there the training benchmark (UNet-ResNet34, 4 x 256 px) ran fp32 at 1.07 img/s
and did not finish six bf16 steps in 420 s (benchmarks/results/cpu-amd-epyc-avx2-2cpu.json). ``auto`` therefore picks:

* CUDA: ``bf16-mixed`` where the GPU supports bf16 (Ampere and newer), else ``16-mixed``;
* CPU: ``bf16-mixed`` when oneDNN reports bf16 support, else ``32-true``.

An explicit bf16 precision on a CPU without bf16 kernels is kept (the user asked for it) but warned about.
"""
from __future__ import annotations

import torch

from histoseg.utils.logging import get_logger

log = get_logger(__name__)

SLOW_BF16 = (
    "trainer.precision={p} on a CPU without oneDNN bf16 kernels (no AVX-512 / AMX): bf16 convolutions and "
    "matmuls run on PyTorch's reference path, often >10x slower than float32. Use trainer.precision=auto "
    "(picks 32-true here) or 32-true."
)


def cpu_has_fast_bf16() -> bool:
    """True when PyTorch's oneDNN has bf16 kernels on this CPU (what makes CPU bf16 autocast fast)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def uses_cuda(accelerator: str | None) -> bool:
    acc = str(accelerator or "auto").lower()
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def resolve_precision(precision, accelerator: str | None = "cpu") -> str:
    """The Lightning precision string for ``precision`` (``auto`` resolved) on ``accelerator``."""
    p = str(precision)
    if p == "auto":
        if uses_cuda(accelerator):
            return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
        return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
    if "bf16" in p and not uses_cuda(accelerator) and not cpu_has_fast_bf16():
        log.warning(SLOW_BF16.format(p=p))
    return p
