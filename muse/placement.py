"""Which GPUs a stage trains on, so that stages the flow runs side by side never share one silently.

A training stage run in-process trains on one local device; on Ray Train it trains on
`workers.num_workers` workers, with a GPU each when `workers.use_gpu`. The flow runs stages
with no path between them concurrently (train-base, train-superres, finetune-decoder), so
before a stage runs it takes its GPUs from one `GpuPool` of this machine's devices and gives
them back when it ends; a stage that finds too few free waits for them. In-process stages
get a device index of their own (`cuda:i`). Ray Train workers on a Ray started here pick
their GPUs themselves, so such a stage takes the whole machine. On a Ray cluster
(`ray.address`), the cluster places the workers and queues a trainer until its GPUs are
free, so those stages take nothing here and run side by side on different GPUs.
`placement.stages_per_gpu` lets small models share: that many stages per device.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from muse.config import PipelineConfig, WorkersConfig

log = logging.getLogger("muse.placement")

# Stage -> its config section's attribute name, for the stages that train a model.
TRAINING_SECTIONS = {"train-clip": "train_clip", "train-vqgan": "train_vqgan", "train-base": "train_base",
                     "train-guide": "train_guide", "train-prior": "train_prior", "train-superres": "train_superres",
                     "finetune-decoder": "finetune_decoder"}


@dataclass(frozen=True)
class Demand:
    """What a stage takes from the local pool: `slots` device slots, or every slot (`whole_machine`)."""

    slots: int = 0
    whole_machine: bool = False


def demand(name: str, config: PipelineConfig, gpus: int) -> Demand:
    """The local GPU slots stage `name` needs on a machine with `gpus` devices: none for a stage that does not
    train or when there is no GPU; one for in-process training; the whole machine for GPU workers of a Ray
    started here; none for workers on a Ray cluster, which places them itself."""
    if gpus == 0 or name not in TRAINING_SECTIONS:
        return Demand()
    workers: WorkersConfig | None = getattr(getattr(config, TRAINING_SECTIONS[name]), "workers", None)
    if workers is None or workers.num_workers == 1:
        return Demand(slots=1)
    if not workers.use_gpu:
        return Demand()
    return Demand() if config.ray.address else Demand(whole_machine=True)


class GpuPool:
    """Device slots (`stages_per_gpu` per device) that concurrent stages take and give back."""

    def __init__(self, gpus: int, stages_per_gpu: int = 1):
        self.free = [i for _ in range(stages_per_gpu) for i in range(gpus)]  # device index per free slot
        self.size = len(self.free)
        self._changed = threading.Condition()

    @classmethod
    def local(cls, stages_per_gpu: int = 1) -> "GpuPool":
        return cls(torch.cuda.device_count() if torch.cuda.is_available() else 0, stages_per_gpu)

    @contextlib.contextmanager
    def take(self, name: str, need: Demand) -> Iterator[torch.device | None]:
        """Hold `need`'s slots while the block runs (waiting until they are free); yields the device an
        in-process stage trains on, or None where the stage chooses none here."""
        count = self.size if need.whole_machine else min(need.slots, self.size)
        if count == 0:
            yield None
            return
        with self._changed:
            if len(self.free) < count:
                log.info("%s: waiting for %d GPU slot(s); %d of %d free", name, count, len(self.free), self.size)
            self._changed.wait_for(lambda: len(self.free) >= count)
            # the least shared device first, so two stages share a GPU only when every GPU has one
            counts = {i: self.free.count(i) for i in self.free}
            self.free.sort(key=lambda i: (-counts[i], i))
            held, self.free = self.free[:count], self.free[count:]
        try:
            yield torch.device("cuda", held[0]) if not need.whole_machine else None
        finally:
            with self._changed:
                self.free += held
                self._changed.notify_all()


_POOLS: dict[int, GpuPool] = {}  # one per sharing setting: the stages of every flow run in this process
_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def placed(name: str, config: PipelineConfig) -> Iterator[torch.device | None]:
    """Run stage `name`'s block holding its GPUs from this process's pool; yields the device it trains on
    in-process (None: the stage's default)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(config.placement.stages_per_gpu)
        if pool is None:
            pool = _POOLS[config.placement.stages_per_gpu] = GpuPool.local(config.placement.stages_per_gpu)
    with pool.take(name, demand(name, config, pool.size)) as device:
        yield device
