"""Sample bytes -> model inputs: images in [-1, 1] and one-hot scene maps, at a tokenizer's resolution.

Shared by every stage that feeds a tokenizer (train-vqgan, tokenize, finetune-decoder), so
an image is resized the same way when a tokenizer learns and when it encodes.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def image_bytes(files: dict[str, bytes]) -> bytes:
    """The image member of a shard sample, whatever its extension."""
    for ext in ("jpg", "png", "jpeg", "webp"):
        if ext in files:
            return files[ext]
    raise KeyError(f"sample has no image member (jpg/png/jpeg/webp); members: {sorted(files)}")


def image_tensor(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image -> [3, R, R] float in [-1, 1] (bicubic resize when the side differs)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(127.5).sub(1)


def scene_tensor(seg_png: bytes, edge_png: bytes, resolution: int, num_labels: int) -> torch.Tensor:
    """Label map + edge map PNGs -> [num_labels + 1, R, R]: one-hot labels, then edges in {0, 1}."""
    labels = Image.open(io.BytesIO(seg_png))
    edges = Image.open(io.BytesIO(edge_png))
    if labels.size != (resolution, resolution):
        labels = labels.resize((resolution, resolution), Image.Resampling.NEAREST)
        edges = edges.resize((resolution, resolution), Image.Resampling.NEAREST)
    lab = torch.from_numpy(np.asarray(labels).astype(np.int64))
    if int(lab.max()) >= num_labels:
        raise ValueError(f"label {int(lab.max())} outside the label space of {num_labels} labels")
    onehot = F.one_hot(lab, num_labels).permute(2, 0, 1).float()
    edge = torch.from_numpy((np.asarray(edges) > 127).astype(np.float32))[None]
    return torch.cat([onehot, edge])


def image_decoder(resolution: int):
    """Raw shard sample -> [3, R, R] in [-1, 1] (for `stream.batches`)."""
    return lambda files: image_tensor(image_bytes(files), resolution)


def scene_decoder(resolution: int, num_labels: int):
    """Raw segments sample -> [num_labels + 1, R, R] (for `stream.batches`)."""
    return lambda files: scene_tensor(files["seg.png"], files["edge.png"], resolution, num_labels)
