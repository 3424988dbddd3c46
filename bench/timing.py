"""Timing shared by the bench scripts: seconds per call after a warm-up, synchronised on GPUs."""

from __future__ import annotations

import time

import torch


def seconds_per_call(fn, calls: int, device: torch.device) -> float:
    """Mean wall time of `calls` calls of fn(), after one warm-up call (allocations, kernel choice)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls


def device_and_autocast() -> tuple[torch.device, torch.dtype | None]:
    """The GPU with bf16 autocast when there is one, else the CPU in fp32 (a bf16 matmul is ~100x slower there)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None
