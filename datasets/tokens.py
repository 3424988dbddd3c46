"""Reading the `tokens` parquet dataset for training: random access and shuffled row-group streaming.

`TokenTable` indexes the row groups of every parquet file of a split (memory-mapped, read
lazily). Two ways in:

- `table[i]` / `TokenDataset`: random access to row i (its row group decoded and cached),
  a map-style `torch.utils.data.Dataset` for DataLoader users.
- `stream(seed, start, rank, world)`: the training path. Epoch e permutes the row groups
  with rng(seed, e); rank r takes every world-th of them (or its share of `streams` such
  splits, `muse.datasets.stream.rank_share`); rows are shuffled inside a window
  of `window` row groups. Only that window is in memory, whatever the dataset size. The
  stream is a pure function of its arguments, so `start` (samples already consumed)
  resumes exactly, skipping whole row groups without reading them.

A row becomes a dict of tensors: token columns as int64 [h*w], `text_emb` float32 [L, D] and
`text_len`, plus `key`/`caption` strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from muse.contracts import TokensSchema
from muse.datasets.stream import rank_share

SCHEMA_FILE = TokensSchema.FILE
SCHEMA_METADATA_KEY = "muse"  # parquet schema metadata: {"geometry": ..., "text": ...}
TOKEN_COLUMNS = ("tokens_low", "tokens_high", "seg_tokens")


def token_file(split: str, index: int) -> str:
    """Name of a tokens artifact's index-th parquet file of a split; the split prefix is what Hugging Face
    `datasets` reads splits from (`val` is its validation split)."""
    return f"{split}-{index:05d}.parquet"


@dataclass(frozen=True)
class RowGroup:
    file: Path
    index: int
    rows: int
    start: int  # global index of its first row


def _rows(table: pa.Table, text_shape: tuple[int, int] | None) -> list[dict]:
    """Arrow rows -> dicts of tensors (fixed-size lists decoded column-wise, not row by row)."""
    n = table.num_rows
    cols: dict[str, list | np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if name in TOKEN_COLUMNS:
            if column.null_count:
                values = [None if v is None else torch.tensor(v, dtype=torch.int64) for v in column.to_pylist()]
                cols[name] = values
            else:
                cols[name] = torch.from_numpy(column.values.to_numpy().astype(np.int64).reshape(n, -1))
        elif name == "text_emb":
            flat = column.values.to_numpy(zero_copy_only=False).astype(np.float32)
            cols[name] = torch.from_numpy(flat.reshape(n, *text_shape))
        elif name == "text_len":
            cols[name] = torch.from_numpy(column.to_numpy().astype(np.int64))
        elif name == "clip_image_emb":
            cols[name] = torch.from_numpy(column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, -1))
        elif name == "micro_conds":
            cols[name] = torch.from_numpy(column.values.to_numpy().astype(np.float32).reshape(n, -1))
        else:
            cols[name] = column.to_pylist()
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


class TokenTable:
    """The row groups of one split of a `tokens` artifact (or any directory of its parquet files)."""

    def __init__(self, root: str | Path, split: str = "train", columns: list[str] | None = None):
        self.root = Path(root)
        files = sorted(self.root.glob(f"{split}-*.parquet"))  # token_file names
        if not files:
            raise FileNotFoundError(f"{self.root}: no {split} parquet files (is this a tokens artifact?)")
        text = TokensSchema.of(self.root).text
        self.text_shape = (text.max_length, text.dim) if text else None
        self.columns = columns
        self.groups: list[RowGroup] = []
        start = 0
        for f in files:
            meta = pq.ParquetFile(f, memory_map=True).metadata
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                self.groups.append(RowGroup(f, g, rows, start))
                start += rows
        self.num_rows = start
        self._cache: tuple[RowGroup, list[dict]] | None = None

    def __len__(self) -> int:
        return self.num_rows

    def column(self, name: str, limit: int) -> np.ndarray:
        """One fixed-size-list column of the first `limit` rows, as a [rows, size] array, without decoding rows."""
        out, rows = [], 0
        for group in self.groups:
            if rows >= limit:
                break
            column = pq.ParquetFile(group.file, memory_map=True).read_row_group(group.index, columns=[name])
            values = column.column(name).combine_chunks()
            out.append(values.values.to_numpy(zero_copy_only=False).reshape(group.rows, -1))
            rows += group.rows
        return np.concatenate(out)[:limit]

    def read_group(self, group: RowGroup) -> list[dict]:
        table = pq.ParquetFile(group.file, memory_map=True).read_row_group(group.index, columns=self.columns)
        return _rows(table, self.text_shape)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_rows:
            raise IndexError(i)
        lo, hi = 0, len(self.groups)
        while hi - lo > 1:  # the last group starting at or before i
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.groups[mid].start <= i else (lo, mid)
        group = self.groups[lo]
        if self._cache is None or self._cache[0] != group:
            self._cache = (group, self.read_group(group))
        return self._cache[1][i - group.start]

    def rank_groups(self, epoch: int, seed: int, rank: int, world: int) -> list[RowGroup]:
        """This rank's row groups of an epoch, in that epoch's order (disjoint across ranks)."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.groups))
        return [self.groups[i] for i in order[rank::world]]

    def stream(self, seed: int, start: int = 0, rank: int = 0, world: int = 1, window: int = 4,
               streams: int | None = None) -> Iterator[dict]:
        """Endless shuffled rows for one rank, skipping the first `start` it would have produced; `streams`:
        split the row groups into that many streams instead of one per rank (`rank_share`)."""
        return rank_share(lambda stream, total, skip: self._stream(seed, skip, stream, total, window),
                          start, rank, world, streams)

    def _stream(self, seed: int, start: int, rank: int, world: int, window: int) -> Iterator[dict]:
        if len(self.groups) < world:
            raise ValueError(f"{len(self.groups)} row groups cannot be split into {world} streams (one per worker, "
                             "or train.data_streams); lower tokenize.row_group_size")
        position, epoch = 0, 0
        while True:
            groups = self.rank_groups(epoch, seed, rank, world)
            epoch_rows = sum(g.rows for g in groups)
            if position + epoch_rows <= start:  # the whole epoch was consumed: skip it unread
                position += epoch_rows
                epoch += 1
                continue
            rng = np.random.default_rng([seed, epoch, rank])
            for w in range(0, len(groups), window):
                chunk = groups[w:w + window]
                order = rng.permutation(sum(g.rows for g in chunk))
                if position + len(order) <= start:
                    position += len(order)
                    continue
                rows = [r for g in chunk for r in self.read_group(g)]
                for j in order:
                    if position >= start:
                        yield rows[j]
                    position += 1
            epoch += 1


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset over a TokenTable (for DataLoader with a DistributedSampler)."""

    def __init__(self, root: str | Path, split: str = "train", columns: list[str] | None = None):
        self.table = TokenTable(root, split, columns)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        return self.table[i]


def collate(rows: list[dict]) -> dict:
    """Stack tensor fields; keep strings as lists. A missing `seg_tokens` becomes -1 everywhere (no scene)."""
    out: dict = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        if k == "seg_tokens":
            side = next((v.numel() for v in values if v is not None), 0)
            values = [v if v is not None else torch.full((side,), -1, dtype=torch.int64) for v in values]
        out[k] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def token_batches(table: TokenTable, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                  world: int = 1, streams: int | None = None) -> Iterator[dict]:
    """Endless collated batches from `table.stream` (start counted in samples)."""
    rows = table.stream(seed, start, rank, world, streams=streams)
    while True:
        yield collate([next(rows) for _ in range(batch_size)])
