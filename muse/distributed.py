"""Data-parallel training on Ray Train: one process per worker, gradients averaged by DDP.

`fit(fn, job, workers)` runs `fn(job)` once in this process when `workers.num_workers` is 1
(a laptop needs no Ray), or on every worker of a Ray Train `TorchTrainer`, which starts the
process group (gloo on CPU, NCCL on GPU). Inside `fn`, `rank_world()` shards the data,
`worker_device()` picks the device and `wrap_ddp(module)` makes its forward average gradients
across workers; objectives with several optimizers and backward passes (a GAN) have the loop
average their gradients instead (`average_gradients`). Rank 0's returned figures come back to
the caller; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from muse.config import RayConfig, WorkersConfig

log = logging.getLogger("muse.distributed")
Job = TypeVar("Job")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def worker_device() -> torch.device:
    """This worker's GPU when it has one (Ray Train assigns them), else the CPU."""
    if torch.cuda.is_available():
        if dist.is_available() and dist.is_initialized():
            from ray.train.torch import get_device

            return get_device()
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The precision a forward runs in: bf16 autocast for "bf16", and for "auto" on a GPU; fp32 otherwise
    (a bf16 matmul is ~100x slower on CPUs without bf16 units)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else torch.float32, enabled=bf16)


def wrap_ddp(module: nn.Module) -> nn.Module:
    """DDP around `module` inside a process group of more than one worker; the module itself otherwise."""
    _, world = rank_world()
    if world == 1:
        return module
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of `params` over the process group in one flattened all-reduce: what DDP does in
    backward, for objectives whose GAN game (two optimizers, gradients taken at the last layer) DDP's reducer
    cannot follow. Every rank holds gradients for the same parameters (which ones depends on the step only)."""
    _, world = rank_world()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)


def broadcast_buffers(modules: list[nn.Module]) -> None:
    """Rank 0's buffers (BatchNorm statistics, say) to every rank, as DDP does before each forward: the
    replicas stay identical whichever rank's checkpoint is read."""
    _, world = rank_world()
    # detached: the quantizer keeps its codebook in a buffer that requires grad
    buffers = [b.detach() for m in modules for b in m.buffers() if b.dtype.is_floating_point]
    if world == 1 or not buffers:
        return
    flat = torch._utils._flatten_dense_tensors(buffers)
    dist.broadcast(flat, 0)
    for buffer, synced in zip(buffers, torch._utils._unflatten_dense_tensors(flat, buffers)):
        buffer.copy_(synced)


FIGURES = "rank0-figures.json"


def _ray_worker(config: dict) -> None:
    """A Ray Train worker: run the function; rank 0 leaves its figures where the driver reads them."""
    figures = config["fn"](config["job"])
    if rank_world()[0] == 0:
        # Ray Train keeps reported metrics only with checkpoints; a file is simpler and survives either version.
        Path(config["figures"]).write_text(json.dumps(figures))


def fit(fn: Callable[[Job], dict], job: Job, workers: WorkersConfig, ray_config: RayConfig,
        storage: Path) -> dict:
    """Run `fn(job)` on `workers.num_workers` data-parallel workers; rank 0's figures."""
    if workers.num_workers == 1:
        return fn(job)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from muse.ray_runtime import init_ray

    init_ray(ray_config)
    scaling = ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                            resources_per_worker={"CPU": workers.cpus_per_worker,
                                                  **({"GPU": 1} if workers.use_gpu else {})})
    storage = Path(storage).resolve()
    figures = storage / FIGURES
    figures.unlink(missing_ok=True)
    trainer = TorchTrainer(_ray_worker, train_loop_config={"fn": fn, "job": job, "figures": str(figures)},
                           scaling_config=scaling, run_config=RunConfig(storage_path=str(storage), name="ray-train"))
    log.info("ray train: %d workers (%s)", workers.num_workers, "GPU" if workers.use_gpu else "CPU, gloo")
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads(figures.read_text())
