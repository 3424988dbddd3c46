"""Ingest sources: where image-caption pairs come from before they are sharded.

A source is enumerated in the main process into a deterministic list of items;
each item's `load()` runs in a worker and returns the raw bytes and caption (or
the reason it cannot). Kinds:

    folder      images with same-key caption files, recursively (`cat.jpg` + `cat.txt`;
                optional `cat.json` and COCO-panoptic `cat.panoptic.png` ride along)
    metadata    metadata.jsonl / .csv / .parquet with an image-path and a caption column
    webdataset  tar shards, img2dataset's layout included; paths or brace patterns
    demo        the generated demo dataset

Keys follow webdataset's rule: a file's key is its path up to the first dot of its basename.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


class SourceError(ValueError):
    """A source that cannot be read at all; the message names the path and what is wrong."""


@dataclass
class RawSample:
    """What a worker gets from a source item: bytes + caption, or the reason it has none."""

    source_id: str
    image: bytes | None = None
    caption: str | None = None
    info: dict = field(default_factory=dict)
    panoptic: bytes | None = None
    reject: str | None = None  # reason, one of the shard stage's reject reasons
    detail: str = ""


@dataclass(frozen=True)
class FileItem:
    """An image on disk with an optional caption file, json sidecar and panoptic mask."""

    source_id: str
    image_path: Path
    caption_path: Path | None
    info_path: Path | None = None
    panoptic_path: Path | None = None
    caption: str | None = None  # inline caption (metadata rows)

    def load(self) -> RawSample:
        raw = RawSample(self.source_id, caption=self.caption)
        try:
            raw.image = self.image_path.read_bytes()
        except FileNotFoundError:
            return RawSample(self.source_id, reject="missing_image", detail=str(self.image_path))
        except OSError as e:
            return RawSample(self.source_id, reject="unreadable", detail=f"{self.image_path}: {e.strerror or e}")
        if self.caption is None:
            if self.caption_path is None:
                return RawSample(self.source_id, reject="no_caption", detail=f"no caption file for {self.image_path}")
            try:
                raw.caption = self.caption_path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                return RawSample(self.source_id, reject="unreadable", detail=f"{self.caption_path}: {e}")
        try:
            if self.info_path is not None:
                raw.info = json.loads(self.info_path.read_text())
            if self.panoptic_path is not None:
                raw.panoptic = self.panoptic_path.read_bytes()
        except (OSError, ValueError) as e:
            return RawSample(self.source_id, reject="bad_sidecar", detail=f"{self.image_path}: {e}")
        return raw


@dataclass(frozen=True)
class BytesItem:
    """A sample already read (from a tar stream)."""

    raw: RawSample

    @property
    def source_id(self) -> str:
        return self.raw.source_id

    def load(self) -> RawSample:
        return self.raw


@dataclass(frozen=True)
class DemoItem:
    """Demo sample `index`; generated in the worker, so nothing touches disk first."""

    index: int
    image_size: int
    seed: int

    @property
    def source_id(self) -> str:
        return f"demo:{self.seed}:{self.image_size}:{self.index}"

    def load(self) -> RawSample:
        from .demo import make_sample

        s = make_sample(self.index, self.image_size, self.seed)
        png, pan = io.BytesIO(), io.BytesIO()
        s.image.save(png, format="PNG")
        s.panoptic.save(pan, format="PNG")
        return RawSample(self.source_id, png.getvalue(), s.caption, s.info(), pan.getvalue())


Item = FileItem | BytesItem | DemoItem


# ----------------------------------------------------------------------------- detection


def detect_kind(source: str | None) -> str:
    """Source kind from its path: None -> demo, *.tar / brace pattern -> webdataset, metadata file or a
    folder holding one -> metadata, other folders -> folder."""
    if source is None:
        return "demo"
    if source.endswith(".tar") or "{" in source:
        return "webdataset"
    path = Path(source)
    if path.is_file():
        if path.suffix in (".jsonl", ".csv", ".parquet"):
            return "metadata"
        raise SourceError(f"{source}: not a folder, metadata (.jsonl/.csv/.parquet) or .tar file")
    if path.is_dir():
        if any((path / n).is_file() for n in METADATA_NAMES):
            return "metadata"
        if any(path.glob("*.tar")):
            return "webdataset"
        return "folder"
    raise SourceError(f"{source}: no such file or folder")


def _key_of(path: Path) -> tuple[str, str]:
    """webdataset's split: ("dir/cat", "seg.png") for "dir/cat.seg.png"."""
    base, _, ext = path.name.partition(".")
    return str(path.parent / base), ext.lower()


# ----------------------------------------------------------------------------- enumeration


def folder_items(root: Path) -> Iterator[Item]:
    """Group files under root by key; every key with an image is one item."""
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            key, ext = _key_of(p.relative_to(root))
            groups.setdefault(key, {})[ext] = p
    for key, files in sorted(groups.items()):
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        if image_ext is None:
            continue  # caption/json without an image: not a sample
        yield FileItem(
            source_id=f"{key}.{image_ext}",
            image_path=files[image_ext],
            caption_path=files.get("txt"),
            info_path=files.get("json"),
            panoptic_path=files.get("panoptic.png"),
        )


def _metadata_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()


def metadata_items(source: Path, image_column: str, caption_column: str) -> Iterator[Item]:
    """One item per metadata row; image paths are relative to the metadata file's folder."""
    path = source if source.is_file() else next(source / n for n in METADATA_NAMES if (source / n).is_file())
    for row_no, row in enumerate(_metadata_rows(path)):
        for column in (image_column, caption_column):
            if column not in row:
                raise SourceError(f"{path}: row {row_no} has no column {column!r} (has: {', '.join(row)})")
        rel = str(row[image_column])
        caption = row[caption_column]
        yield FileItem(
            source_id=rel,
            image_path=path.parent / rel,
            caption_path=None,
            caption="" if caption is None else str(caption),
        )


def tar_paths(source: str) -> list[Path]:
    """Tar files named by a path, brace pattern or folder of tars."""
    if Path(source).is_dir():
        return sorted(Path(source).glob("*.tar"))
    return [Path(p) for p in braceexpand.braceexpand(source)]


def webdataset_items(source: str) -> Iterator[Item]:
    """Stream tars member by member, grouping consecutive members by key (as webdataset does).

    An unreadable tar, or the sample a truncated tar breaks off in, becomes a rejected item."""
    for tar_path in tar_paths(source):
        key, files = None, {}
        try:
            with tarfile.open(tar_path) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    m_key, ext = _key_of(Path(m.name))
                    if m_key != key and files:
                        yield _tar_sample(f"{tar_path.name}:{key}", files)
                        files = {}
                    key = m_key
                    files[ext] = tf.extractfile(m).read()
        except (OSError, tarfile.TarError) as e:
            reason = "truncated" if key is not None else "unreadable"
            yield BytesItem(RawSample(f"{tar_path.name}:{key or '?'}", reject=reason, detail=f"{tar_path}: {e}"))
            continue
        if files:
            yield _tar_sample(f"{tar_path.name}:{key}", files)


def _tar_sample(source_id: str, files: dict[str, bytes]) -> BytesItem:
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    if image_ext is None:
        return BytesItem(RawSample(source_id, reject="missing_image", detail=f"members: {', '.join(files)}"))
    info = {}
    if "json" in files:
        try:
            info = json.loads(files["json"])
        except ValueError:
            info = {}
    caption = files["txt"].decode("utf-8", errors="replace") if "txt" in files else None
    if caption is None:
        return BytesItem(RawSample(source_id, reject="no_caption", detail="no .txt member"))
    return BytesItem(RawSample(source_id, files[image_ext], caption, info, files.get("panoptic.png")))


def iter_items(kind: str, source: str | None, image_column: str, caption_column: str,
               demo_num_samples: int, demo_image_size: int, demo_seed: int) -> Iterator[Item]:
    """Items of a source, in a deterministic order."""
    if kind == "demo":
        return (DemoItem(i, demo_image_size, demo_seed) for i in range(demo_num_samples))
    if source is None:
        raise SourceError(f"source kind {kind!r} needs a source path")
    if kind == "folder":
        return folder_items(Path(source))
    if kind == "metadata":
        return metadata_items(Path(source), image_column, caption_column)
    return webdataset_items(source)


def fingerprint(kind: str, source: str | None) -> list:
    """What identifies the source's content cheaply: (path, size, mtime) of every file it reads."""
    if kind == "demo" or source is None:
        return []
    if kind == "webdataset":
        paths = tar_paths(source)
    else:
        root = Path(source)
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        if kind == "metadata" and root.is_file():
            paths += sorted(p for p in root.parent.rglob("*") if p.is_file() and p != root)
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p), None, None])
    return out
