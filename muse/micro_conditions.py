"""Micro-conditioning (SDXL, aMUSEd): facts about each training image fed to the transformer beside its caption.

Each token row carries `micro_conds`, five numbers in the order of `NAMES`: the image's size
before `shard` resized it, the top-left corner of the square `shard` cropped from it (in
original pixels: `shard` center-crops), and an aesthetic score read from the sample's metadata
(`tokenize.aesthetic_field`; NaN where a row has none). A transformer built with
`micro_conditions` embeds the groups it names (`GROUPS`) with Fourier features, NaN as "unknown"
(zeros), so it learns what an upscaled, cropped or low-scored image looks like, and generation
asks for the values it wants (by default the training rows' medians, which the model records).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from muse.datasets.shards import metadata_value

NAMES = ("original_width", "original_height", "crop_top", "crop_left", "aesthetic")
GROUPS = {"original_size": (0, 1), "crop": (2, 3), "aesthetic": (4,)}  # what a model may be conditioned on
FOURIER_DIM = 64  # features per number: sin and cos of 32 frequencies


def of_sample(info: dict, aesthetic_field: str | None) -> list[float]:
    """The five numbers of one sample's metadata (its `json`, as `shard` wrote it)."""
    w, h = float(info["original_width"]), float(info["original_height"])
    side = min(w, h)
    score = metadata_value(info, aesthetic_field) if aesthetic_field else None
    aesthetic = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else math.nan
    return [w, h, (h - side) // 2, (w - side) // 2, aesthetic]


def medians(rows: np.ndarray) -> dict[str, float | None]:
    """Per name, the median over [N, 5] rows (NaNs left out; None when every row lacks it)."""
    out = {}
    for i, name in enumerate(NAMES):
        known = rows[:, i][~np.isnan(rows[:, i])]
        out[name] = round(float(np.median(known)), 4) if known.size else None
    return out


def indices(groups: tuple[str, ...]) -> list[int]:
    """Positions in `NAMES` of the numbers the groups cover, in order."""
    return [i for g in groups for i in GROUPS[g]]


def fourier(values: torch.Tensor, dim: int = FOURIER_DIM) -> torch.Tensor:
    """[B, k] numbers -> [B, k * dim] sin/cos features over log-spaced periods from 1 to 10^4; NaN -> zeros."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=values.device) / half)
    known = ~torch.isnan(values)
    angles = torch.nan_to_num(values.float())[..., None] * freqs
    features = torch.cat([angles.sin(), angles.cos()], -1) * known[..., None]
    return features.flatten(1)


def of_batch(model, batch: dict) -> torch.Tensor | None:
    """A token batch's `micro_conds` when the transformer reads them, else None."""
    return batch["micro_conds"] if model.spec.micro_conditions else None
