"""A deterministic, resumable sample stream over webdataset tars, for training.

Epoch e visits the tars in an order drawn from rng(seed, e) and passes samples
through a shuffle buffer driven by the same rng. The stream is a pure function
of (files, seed, buffer), so position p — samples already consumed — identifies
where training stands: resuming replays the raw bytes up to p without decoding
them and continues exactly where the interrupted run would have. Ranks of a
data-parallel job take disjoint tars (`rank::world`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a tar, grouping consecutive members by key."""
    key, files = None, {}
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, _, ext = Path(m.name).name.partition(".")
            k = str(Path(m.name).parent / k) if Path(m.name).parent != Path(".") else k
            if k != key and files:
                yield key, files
                files = {}
            key = k
            files[ext] = tf.extractfile(m).read()
    if files:
        yield key, files


def sample_stream(
    files: list[Path], seed: int, start: int = 0, buffer: int = 256, rank: int = 0, world: int = 1
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Endless shuffled stream of raw samples, skipping the first `start` (already consumed)."""
    files = sorted(files)[rank::world] if len(files) >= world else sorted(files)
    if not files:
        raise ValueError("no tar files to stream")
    position, epoch = 0, 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        pool: list[tuple[str, dict[str, bytes]]] = []
        for i in rng.permutation(len(files)):
            for sample in iter_tar(files[i]):
                pool.append(sample)
                if len(pool) >= buffer:
                    j = int(rng.integers(len(pool)))
                    pool[j], pool[-1] = pool[-1], pool[j]
                    out = pool.pop()
                    if position >= start:
                        yield out
                    position += 1
        for j in rng.permutation(len(pool)):
            if position >= start:
                yield pool[j]
            position += 1
        epoch += 1


def batches(
    stream: Iterator[tuple[str, dict[str, bytes]]], batch_size: int, decode: Callable[[dict[str, bytes]], torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Stack `batch_size` decoded samples at a time."""
    while True:
        yield torch.stack([decode(next(stream)[1]) for _ in range(batch_size)])
