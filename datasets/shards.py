"""The `shards` artifact format: webdataset tars per split, img2dataset-compatible keys.

    STORE/shards/VERSION/train/000000.tar, 000000.stats.json, ...
    STORE/shards/VERSION/val/000000.tar, ...

Per sample `KEY.jpg` (or `.png`), `KEY.txt`, `KEY.json` and, when the source
shipped one, `KEY.panoptic.png` (COCO-panoptic ids, cropped like the image).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator

import webdataset as wds
from PIL import Image

SPLITS = ("train", "val")


def shard_files(root: Path, split: str) -> list[Path]:
    """Tar files of one split under a shards artifact directory."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    return sorted((root / split).glob("*.tar"))


def read_samples(root: Path, split: str) -> Iterator[dict]:
    """Decoded samples of one split in shard order: key, image (PIL RGB), caption, info, panoptic (or None)."""
    urls = [str(p) for p in shard_files(root, split)]
    if not urls:
        return
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        image_key = "jpg" if "jpg" in s else "png"
        yield {
            "key": s["__key__"],
            "image": Image.open(io.BytesIO(s[image_key])).convert("RGB"),
            "caption": s["txt"].decode("utf-8"),
            "info": json.loads(s["json"]),
            "panoptic": Image.open(io.BytesIO(s["panoptic.png"])).convert("RGB") if "panoptic.png" in s else None,
        }


def metadata_value(info: dict, field: str):
    """The value at a dotted path of a sample's metadata (list items by index); None when absent."""
    node = info
    for part in field.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
