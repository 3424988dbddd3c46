"""A deterministic, resumable sample stream over webdataset tars, for training.

Epoch e visits the tars in an order drawn from rng(seed, e) and passes samples
through a shuffle buffer driven by the same rng. The stream is a pure function
of (files, seed, buffer), so position p — samples already consumed — identifies
where training stands: resuming replays the raw bytes up to p without decoding
them and continues exactly where the interrupted run would have. Ranks of a
data-parallel job take disjoint tars (`rank::world`); with `streams` set, the tars
are split into that many disjoint streams instead and each rank reads its share of
them in turn (`rank_share`), so a step's samples do not depend on the worker count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from muse.datasets.tars import iter_tar

T = TypeVar("T")


def rank_share(make: Callable[[int, int, int], Iterator[T]], start: int, rank: int, world: int,
               streams: int | None) -> Iterator[T]:
    """This rank's share of `streams` disjoint streams (None: one per rank): streams rank, rank + world, ...,
    one item of each in turn, so every k * n consecutive items (k streams) hold n of each. `make(stream,
    streams, skip)` opens one of them past its first `skip` items; `start` items of the share were consumed,
    start / k of each stream."""
    streams = streams or world
    if streams % world:
        raise ValueError(f"{streams} data streams cannot be split evenly over {world} workers")
    mine = range(rank, streams, world)
    if start % len(mine):
        raise ValueError(f"position {start} is not a whole number of rounds over {len(mine)} streams")
    if len(mine) == 1:
        return make(rank, streams, start)
    return _round_robin([make(d, streams, start // len(mine)) for d in mine])


def _round_robin(iterators: list[Iterator[T]]) -> Iterator[T]:
    while True:
        for it in iterators:
            yield next(it)


def sample_stream(
    files: list[Path], seed: int, start: int = 0, buffer: int = 256, rank: int = 0, world: int = 1,
    streams: int | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Endless shuffled stream of raw samples, skipping the first `start` (already consumed); `streams`: split
    the tars into that many streams instead of one per rank (`rank_share`)."""
    return rank_share(lambda stream, total, skip: _tar_stream(files, seed, skip, buffer, stream, total),
                      start, rank, world, streams)


def _tar_stream(files: list[Path], seed: int, start: int, buffer: int, rank: int,
                world: int) -> Iterator[tuple[str, dict[str, bytes]]]:
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
