"""Stage `shard`: ingest image-caption data into webdataset shards (the `shards` artifact).

Items of the source are enumerated in a fixed order and processed in windows by
a process pool, or by Ray Data across a cluster (`shard.engine: ray`, where the
workers read a webdataset source's tars themselves): decode (EXIF orientation
applied, any mode -> RGB, alpha over white), reject what cannot be used, resize
the shorter side and center-crop to
the largest resolution a tokenizer reads, encode. The main process then drops
exact duplicates (first occurrence wins), assigns the split by hashing the
item's source id, and writes in item order — so the output is byte-identical
whatever the worker count. A sample's key is its producer's key (`shard_key`), else
its index in read order (9 digits); a key already taken is rejected. Every rejected
item is counted by reason and the first few of each reason are named in the manifest
and the log.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from muse.artifacts.store import PREVIEW_DIR, Artifact
from muse.config import PipelineConfig
from muse.datasets.shards import SPLITS
from muse.datasets.sources import (
    Item,
    SourceError,
    detect_kind,
    fingerprint,
    iter_items,
    tar_items,
    tar_urls,
)
from muse.labelled_grid import caption_lines
from muse.stage import StageContext

NAME = "shard"
INPUTS: tuple[str, ...] = ()
OUTPUTS: tuple[str, ...] = ("shards",)
CODE_VERSION = "2"

REJECT_REASONS = (
    "corrupt", "truncated", "empty", "too_small", "too_large", "no_caption",
    "duplicate", "duplicate_key", "missing_image", "unreadable", "bad_sidecar", "outside_source",
)
EXAMPLES_PER_REASON = 5
WINDOW = 256  # items in flight: bounds memory whatever the source size
RAY_CHUNK = 64  # items per Ray Data row of a non-tar source: enough work to outweigh a task's scheduling

log = logging.getLogger("muse.stages.shard")


@dataclass(frozen=True)
class ImageParams:
    """What a worker needs to turn raw bytes into a stored image."""

    resolution: int
    min_side: int
    max_pixels: int
    image_format: str
    jpeg_quality: int
    max_caption_chars: int


@dataclass
class Processed:
    source_id: str
    key: str | None  # the producer's key, made a valid shard key
    image: bytes
    caption: str
    info: dict
    panoptic: bytes | None
    sha256: str
    caption_flags: tuple[str, ...] = ()  # counted, not rejected: captions_truncated, captions_not_utf8


@dataclass
class Rejected:
    source_id: str
    reason: str
    detail: str


def source_kind(config: PipelineConfig) -> str:
    c = config.shard
    return detect_kind(c.source) if c.source_kind == "auto" else c.source_kind


def config_of(config: PipelineConfig) -> dict:
    """Shard settings (not `workers` or `engine`: the output does not depend on them), crop size, and the source's
    identity."""
    kind = source_kind(config)
    return {
        "shard": config.shard.model_dump(mode="json", exclude={"workers", "engine"}),
        "source_kind": kind,
        "resolution": config.image_resolution,
        "demo": config.demo.model_dump(mode="json") if kind == "demo" else None,
        "source_fingerprint": hashlib.sha256(
            json.dumps(fingerprint(kind, config.shard.source)).encode()
        ).hexdigest(),
    }


# ----------------------------------------------------------------------------- per sample (workers)


def shard_key(producer_key: str) -> str:
    """The shard key of a producer's key: every character but letters, digits, `_` and `-` becomes `_` (a dot would
    end a webdataset key, a slash would make it a folder), so img2dataset's keys are kept as they are."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", producer_key)


def normalize_caption(text: str) -> str:
    """Collapse runs of whitespace (newlines, tabs) into single spaces."""
    return " ".join(text.split())


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited over white, not left black; 16- and 32-bit
    grey levels are scaled to 8 bits (PIL's own conversion clips them, turning a 16-bit photo white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        levels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or levels.max() > 255 else 255.0
        return Image.fromarray((levels / top * 255).round().clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Scale the shorter side to `size`, then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def process(item: Item, params: ImageParams) -> Processed | Rejected:
    """Load, validate, orient, crop and encode one item; never raises for bad data."""
    raw = item.load()
    sid = raw.source_id
    if raw.reject:
        return Rejected(sid, raw.reject, raw.detail)
    if not raw.image:
        return Rejected(sid, "empty", "zero-byte image")
    caption = normalize_caption(raw.caption or "")
    if not caption:
        return Rejected(sid, "no_caption", "empty caption")
    truncated = len(caption) > params.max_caption_chars
    caption = caption[: params.max_caption_chars]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw.image))
        except Image.DecompressionBombError as e:
            return Rejected(sid, "too_large", str(e))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            return Rejected(sid, "corrupt", f"not a readable image: {e}")
        w, h = img.size
        if w * h > params.max_pixels:
            return Rejected(sid, "too_large", f"{w}x{h} > {params.max_pixels} pixels")
        if min(w, h) < params.min_side:
            return Rejected(sid, "too_small", f"{w}x{h}, shorter side < {params.min_side}")
        if img.format == "JPEG":
            # Decode at the smallest DCT scale that still covers the crop: much less work for big photos.
            scale = params.resolution / min(w, h)
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        try:
            img.load()
        except OSError as e:
            return Rejected(sid, "truncated" if "truncated" in str(e) else "corrupt", str(e))
        except (SyntaxError, ValueError) as e:
            return Rejected(sid, "corrupt", str(e))
    img = resize_center_crop(to_rgb(ImageOps.exif_transpose(img)), params.resolution, Image.Resampling.BICUBIC)

    panoptic = None
    if raw.panoptic is not None:
        try:
            pan = Image.open(io.BytesIO(raw.panoptic)).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            return Rejected(sid, "bad_sidecar", f"panoptic mask: {e}")
        if pan.size != (w, h):
            return Rejected(sid, "bad_sidecar", f"panoptic mask is {pan.size[0]}x{pan.size[1]}, image {w}x{h}")
        # Nearest keeps segment ids intact; same geometry as the image so pixels stay aligned.
        panoptic = _encode(resize_center_crop(pan, params.resolution, Image.Resampling.NEAREST), "png", 0)

    info = {
        "source": sid,
        "caption": caption,
        "width": params.resolution,
        "height": params.resolution,
        "original_width": w,
        "original_height": h,
        "sha256": hashlib.sha256(raw.image).hexdigest(),
    }
    if raw.info:
        info["source_info"] = raw.info
    key = None if raw.key is None else shard_key(raw.key)
    flags = (("captions_truncated",) if truncated else ()) + (() if raw.caption_utf8 else ("captions_not_utf8",))
    return Processed(sid, key, _encode(img, params.image_format, params.jpeg_quality), caption, info, panoptic,
                     info["sha256"], flags)


# ----------------------------------------------------------------------------- the stage (main process)


def split_of(source_id: str, val_fraction: float) -> str:
    """Deterministic split: the source id's hash, as a fraction of 2^32, against val_fraction."""
    h = int(hashlib.sha256(source_id.encode()).hexdigest()[:8], 16)
    return "val" if h / 2**32 < val_fraction else "train"


def _windows(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while window := list(islice(it, size)):
        yield window


def _process_all(kind: str, items: Iterable[Item], params: ImageParams,
                 config: PipelineConfig) -> Iterator[Processed | Rejected]:
    """Results in item order: in this process, a spawn pool (safe beside Prefect's threads) or Ray Data."""
    c = config.shard
    if c.engine == "ray":
        yield from _process_on_ray(kind, items, params, config)
        return
    if c.workers == 1:
        for item in items:
            yield process(item, params)
        return
    with multiprocessing.get_context("spawn").Pool(c.workers) as pool:
        for window in _windows(items, WINDOW):
            yield from pool.starmap(process, [(item, params) for item in window], chunksize=8)


def _process_part(part: str | list[Item], params: ImageParams) -> list[dict]:
    """One Ray Data row's work: a source tar (read on the worker) or a chunk of items, as result rows."""
    items = tar_items(part) if isinstance(part, str) else part
    return [{"result": process(item, params)} for item in items]


def _process_on_ray(kind: str, items: Iterable[Item], params: ImageParams,
                    config: PipelineConfig) -> Iterator[Processed | Rejected]:
    """A Ray Data pipeline over the cluster: one task per source tar (a webdataset source: each tar is read where
    it is processed) or per chunk of RAY_CHUNK items (the others), its results streamed back in source order."""
    import ray

    from muse.ray_runtime import init_ray

    init_ray(config.ray)
    parts: list[str | list[Item]] = (tar_urls(config.shard.source) if kind == "webdataset"
                                     else list(_windows(items, RAY_CHUNK)))
    if not parts:
        return
    log.info("shard: Ray Data over %d %s", len(parts), "tars" if kind == "webdataset" else f"chunks of {RAY_CHUNK}")
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True  # dedupe and keys need the read order
    try:
        rows = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
        for row in rows.flat_map(lambda row: _process_part(row["part"], params)).iter_rows():
            yield row["result"]
    finally:
        options.preserve_order = before


def _preview(samples: list[tuple[bytes, str]], path: Path, thumb: int = 128) -> None:
    """A grid of thumbnails with their captions underneath."""
    cols = 4
    rows = (len(samples) + cols - 1) // cols
    cell_h = thumb + 40
    grid = Image.new("RGB", (cols * thumb, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (data, caption) in enumerate(samples):
        x, y = (i % cols) * thumb, (i // cols) * cell_h
        grid.paste(Image.open(io.BytesIO(data)).convert("RGB").resize((thumb, thumb)), (x, y))
        draw.multiline_text((x + 2, y + thumb + 1), "\n".join(caption_lines(caption, thumb)), fill="black", spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run(ctx: StageContext) -> Artifact:
    """Read the configured source and write the `shards` artifact."""
    config = ctx.config
    c = config.shard
    kind = source_kind(config)
    params = ImageParams(config.image_resolution, c.min_side, c.max_pixels, c.image_format, c.jpeg_quality,
                         c.max_caption_chars)
    items = iter_items(kind, c.source, c.image_column, c.caption_column, c.key_column,
                       config.demo.num_samples, config.demo.image_size, config.demo.seed)
    total = config.demo.num_samples if kind == "demo" else None
    log.info("shard: reading %s source %s at %dpx (%s) with %s",
             kind, c.source or "(demo)", params.resolution, c.image_format,
             "Ray Data" if c.engine == "ray" else f"{c.workers} workers")

    read, rejected, flagged = 0, Counter(), Counter()
    examples: dict[str, list[str]] = {}
    seen: set[str] = set()
    keys: set[str] = set()
    written = {s: 0 for s in SPLITS}
    shard_stats: dict[str, dict[int, dict]] = {s: {} for s in SPLITS}
    preview: list[tuple[bytes, str]] = []
    nbytes = 0
    start = time.perf_counter()

    with ctx.commit("shards") as out:
        writers = {}
        for s in SPLITS:
            (out.path / s).mkdir()
            writers[s] = wds.ShardWriter(str(out.path / s / "%06d.tar"), maxcount=c.samples_per_shard,
                                         maxsize=float("inf"), verbose=0, mtime=0.0)
        bar = tqdm(total=total, unit="img", desc="shard", mininterval=2.0, disable=None)  # a terminal only
        try:
            for index, result in enumerate(_process_all(kind, items, params, config)):
                read += 1
                bar.update(1)
                if isinstance(result, Processed):
                    key = result.key or f"{index:09d}"  # the producer's key, else the read index
                    if c.dedupe and result.sha256 in seen:
                        result = Rejected(result.source_id, "duplicate", f"sha256 {result.sha256[:16]}")
                    elif key in keys:
                        result = Rejected(result.source_id, "duplicate_key", f"key {key} was taken by an earlier sample")
                if isinstance(result, Rejected):
                    rejected[result.reason] += 1
                    bucket = examples.setdefault(result.reason, [])
                    if len(bucket) < EXAMPLES_PER_REASON:
                        bucket.append(f"{result.source_id}: {result.detail}")
                        log.warning("shard: rejected %s (%s): %s", result.source_id, result.reason, result.detail)
                    continue
                seen.add(result.sha256)
                keys.add(key)
                flagged.update(result.caption_flags)
                split = split_of(result.source_id, c.val_fraction)
                sample = {"__key__": key, c.image_format: result.image, "txt": result.caption,
                          "json": json.dumps({"key": key, "split": split, **result.info}).encode()}
                if result.panoptic is not None:
                    sample["panoptic.png"] = result.panoptic
                writers[split].write(sample)
                size = sum(len(v) for k, v in sample.items() if k != "__key__")
                nbytes += size
                written[split] += 1
                stats = shard_stats[split].setdefault(writers[split].shard - 1, {"count": 0, "bytes": 0, "first_key": key})
                stats.update(count=stats["count"] + 1, bytes=stats["bytes"] + size, last_key=key)
                if split == "train" and len(preview) < 16:
                    preview.append((result.image, result.caption))
        finally:
            bar.close()
            for w in writers.values():
                w.close()

        elapsed = time.perf_counter() - start
        if not sum(written.values()):
            reasons = ", ".join(f"{r} {n}" for r, n in rejected.most_common()) or "nothing found"
            first = next((ex[0] for ex in examples.values() if ex), "")
            raise SourceError(f"source {c.source or '(demo)'} ({kind}) yielded no valid samples: read {read}; "
                              f"rejected: {reasons}" + (f"; e.g. {first}" if first else ""))
        for s in SPLITS:
            for shard, stats in shard_stats[s].items():
                (out.path / s / f"{shard:06d}.stats.json").write_text(json.dumps({"split": s, **stats}, indent=1))
        if preview:
            _preview(preview, out.path / PREVIEW_DIR / "samples.png")

        out.metrics = {
            "read": read,
            "written": sum(written.values()),
            "written_train": written["train"],
            "written_val": written["val"],
            "rejected": sum(rejected.values()),
            **{f"rejected_{r}": rejected[r] for r in REJECT_REASONS},
            "captions_truncated": flagged["captions_truncated"], "captions_not_utf8": flagged["captions_not_utf8"],
            "bytes": nbytes,
            "images_per_s": round(read / elapsed, 1),
        }
        out.details = {
            "source": c.source, "source_kind": kind, "resolution": params.resolution,
            "image_format": c.image_format, "rejected_examples": examples,
            "shards": {s: len(shard_stats[s]) for s in SPLITS},
        }
        log.info("shard: read %d, wrote %d train + %d val in %.1fs (%.1f img/s), rejected %s",
                 read, written["train"], written["val"], elapsed, read / elapsed, dict(rejected) or "none")
    return out.artifact
