"""Ingest sources: where image-caption pairs come from before they are sharded.

A source is enumerated in the main process into a deterministic list of items;
each item's `load()` runs in a worker and returns the raw bytes and caption (or
the reason it cannot). Kinds:

    folder      images with same-key caption files, recursively (`cat.jpg` + `cat.txt`;
                optional `cat.json` and COCO-panoptic `cat.panoptic.png` ride along)
    metadata    metadata.jsonl / .csv / .parquet rows with an image column and a caption column:
                a path relative to the metadata file, or the image bytes themselves (img2dataset's
                parquet output, Hugging Face parquet `Image` structs). A folder may hold one at its
                root, one per split folder (Hugging Face ImageFolder: `train/metadata.jsonl`, ...),
                or parquet files side by side (`00000.parquet`, ...)
    webdataset  tar shards (`.tar`, `.tar.gz`, `.tgz`), img2dataset's layout included: a path, a folder
                of tars, a brace pattern, or an fsspec URL (`s3://`, `gs://`, `https://`, ...) of either
    demo        the generated demo dataset

Every sample carries its producer's key where it has one: a tar member's key (webdataset's rule:
the member name up to the first dot of its basename), the metadata's `key` column, else the
image's path relative to the source without its extension. Local reads stay inside the source
folder: a path or symlink that leads out of it is rejected, not read.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import braceexpand

from muse.datasets.tars import TarBroken, iter_tar, member_key
from muse.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_COLUMNS = ("file_name", "image", "jpg", "png", "webp")  # tried in order when shard.image_column is None
CAPTION_COLUMNS = ("text", "caption", "txt")


class SourceError(UserError, ValueError):
    """A source that cannot be read at all; the message names the path and what is wrong."""


def decode_caption(data: bytes) -> tuple[str, bool]:
    """A caption file's text and whether it was valid UTF-8 (invalid bytes become U+FFFD and are counted)."""
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), False


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
    key: str | None = None  # the producer's key, when it has one
    caption_utf8: bool = True  # False: the caption bytes were not UTF-8 and were decoded with replacements


@dataclass(frozen=True)
class FileItem:
    """An image on disk with an optional caption file, json sidecar and panoptic mask, all under `root`."""

    source_id: str
    root: Path
    image_path: Path
    caption_path: Path | None
    info_path: Path | None = None
    panoptic_path: Path | None = None
    caption: str | None = None  # inline caption (metadata rows)
    key: str | None = None
    info: tuple = ()  # inline metadata fields (key, value) of a metadata row

    def _read(self, path: Path) -> bytes:
        """Bytes of a file that must resolve inside the source root (symlinks and `..` included)."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise PermissionError(f"{path} leads outside the source folder {self.root}")
        return resolved.read_bytes()

    def load(self) -> RawSample:
        raw = RawSample(self.source_id, caption=self.caption, info=dict(self.info), key=self.key)
        try:
            raw.image = self._read(self.image_path)
        except PermissionError as e:
            return RawSample(self.source_id, reject="outside_source", detail=str(e))
        except FileNotFoundError:
            return RawSample(self.source_id, reject="missing_image", detail=str(self.image_path))
        except OSError as e:
            return RawSample(self.source_id, reject="unreadable", detail=f"{self.image_path}: {e.strerror or e}")
        if self.caption is None:
            if self.caption_path is None:
                return RawSample(self.source_id, reject="no_caption", detail=f"no caption file for {self.image_path}")
            try:
                raw.caption, raw.caption_utf8 = decode_caption(self._read(self.caption_path))
            except PermissionError as e:
                return RawSample(self.source_id, reject="outside_source", detail=str(e))
            except OSError as e:
                return RawSample(self.source_id, reject="unreadable", detail=f"{self.caption_path}: {e}")
        try:
            if self.info_path is not None:
                raw.info = json.loads(self._read(self.info_path))
            if self.panoptic_path is not None:
                raw.panoptic = self._read(self.panoptic_path)
        except PermissionError as e:
            return RawSample(self.source_id, reject="outside_source", detail=str(e))
        except (OSError, ValueError) as e:
            return RawSample(self.source_id, reject="bad_sidecar", detail=f"{self.image_path}: {e}")
        return raw


@dataclass(frozen=True)
class BytesItem:
    """A sample already read (from a tar stream, or a parquet row holding the image bytes)."""

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


# ----------------------------------------------------------------------------- paths and URLs


def is_url(source: str) -> bool:
    """An fsspec URL (`s3://...`, `https://...`, `file://...`) rather than a local path."""
    return "://" in source


def _is_tar(name: str) -> bool:
    return name.endswith(TAR_SUFFIXES)


def _metadata_files(root: Path) -> list[Path]:
    """Metadata at a folder's root, else one per split folder (ImageFolder), else parquet files side by side."""
    for candidates in ([root / n for n in METADATA_NAMES],
                       sorted(p for d in root.iterdir() if d.is_dir() for p in (d / n for n in METADATA_NAMES))):
        found = [p for p in candidates if p.is_file()]
        if found:
            return found
    return sorted(root.glob("*.parquet"))


def detect_kind(source: str | None) -> str:
    """Source kind from its path: None -> demo, a tar / brace pattern / URL -> webdataset, a metadata file or a
    folder holding metadata -> metadata, a folder of tars -> webdataset, other folders -> folder."""
    if source is None:
        return "demo"
    if source.startswith("pipe:"):
        raise SourceError(f"{source}: 'pipe:' sources run a shell command and are not accepted; "
                          "give a path or an fsspec URL")
    if is_url(source) or _is_tar(source) or "{" in source:
        return "webdataset"
    path = Path(source)
    if path.is_file():
        if path.suffix in (".jsonl", ".csv", ".parquet"):
            return "metadata"
        raise SourceError(f"{source}: not a folder, metadata (.jsonl/.csv/.parquet) or tar file")
    if path.is_dir():
        if any(p for p in path.iterdir() if p.is_file() and _is_tar(p.name)):
            return "webdataset"
        if _metadata_files(path):
            return "metadata"
        return "folder"
    raise SourceError(f"{source}: no such file or folder")


FOLDER_ENDINGS = ("panoptic.png", "txt", "json", *IMAGE_EXTS)


def _folder_key_of(path: Path) -> tuple[str, str]:
    """A folder file's (key, ending) by its known ending, so dotted names (`my.photo.png`, `my.photo.txt`) keep
    their whole stem; other files split like webdataset's."""
    name = path.name.lower()
    for ending in FOLDER_ENDINGS:
        if name.endswith("." + ending) and len(name) > len(ending) + 1:
            return str(path.parent / path.name[: -len(ending) - 1]), ending
    return member_key(path.as_posix())


# ----------------------------------------------------------------------------- enumeration


def folder_items(root: Path) -> Iterator[Item]:
    """Group files under root by key; every key with an image is one item."""
    root = root.resolve()
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            key, ext = _folder_key_of(p.relative_to(root))
            groups.setdefault(key, {})[ext] = p
    for key, files in sorted(groups.items()):
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        if image_ext is None:
            continue  # caption/json without an image: not a sample
        yield FileItem(
            source_id=f"{key}.{image_ext}",
            root=root,
            image_path=files[image_ext],
            caption_path=files.get("txt"),
            info_path=files.get("json"),
            panoptic_path=files.get("panoptic.png"),
            key=key,
        )


def _metadata_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) per row; `where` names the file and line or row for errors."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield f"{path}:{line_no}", json.loads(line)
                        except json.JSONDecodeError as e:
                            raise SourceError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
            except UnicodeDecodeError as e:
                raise SourceError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="strict") as f:
            try:
                for row_no, row in enumerate(csv.DictReader(f), 2):
                    yield f"{path}:{row_no}", row
            except UnicodeDecodeError as e:
                raise SourceError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    else:
        import pyarrow.parquet as pq

        row_no = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"{path}: row {row_no}", row
                row_no += 1


def _column(row: dict, wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if wanted is not None:
        if wanted not in row:
            raise SourceError(f"{where}: no column {wanted!r} (has: {', '.join(row)})")
        return wanted
    found = next((c for c in candidates if c in row), None)
    if found is None:
        raise SourceError(f"{where}: no {what} column: none of {', '.join(candidates)} (has: {', '.join(row)}); "
                          f"set shard.{what}_column")
    return found


def _inline_info(row: dict, skip: set[str]) -> tuple:
    """The row's other plain fields (url, sizes, status, an aesthetic score, ...), kept in the sample's json."""
    return tuple((k, v) for k, v in row.items() if k not in skip and isinstance(v, (str, int, float, bool)))


def metadata_items(source: Path, image_column: str | None, caption_column: str | None,
                   key_column: str) -> Iterator[Item]:
    """One item per metadata row; image paths are relative to the metadata file's folder."""
    paths = [source] if source.is_file() else _metadata_files(source)
    root = (source.parent if source.is_file() else source).resolve()
    for path in paths:
        image_col = caption_col = None
        for where, row in _metadata_rows(path):
            if not isinstance(row, dict):
                raise SourceError(f"{where}: a row must be an object with named columns, got {type(row).__name__}")
            image_col = image_col or _column(row, image_column, IMAGE_COLUMNS, "image", where)
            caption_col = caption_col or _column(row, caption_column, CAPTION_COLUMNS, "caption", where)
            for column in (image_col, caption_col):
                if column not in row:
                    raise SourceError(f"{where}: no column {column!r} (has: {', '.join(row)})")
            yield _metadata_item(path, root, where, row, image_col, caption_col, key_column)


def _metadata_item(path: Path, root: Path, where: str, row: dict, image_col: str, caption_col: str,
                   key_column: str) -> Item:
    caption = row[caption_col]
    if caption is not None and not isinstance(caption, str):
        return BytesItem(RawSample(where, reject="no_caption", detail=f"column {caption_col!r} is not text"))
    key = row.get(key_column)
    key = None if key is None else str(key)
    info = _inline_info(row, {image_col, caption_col})
    image = row[image_col]
    if isinstance(image, dict):  # a Hugging Face Image struct: bytes, else a path
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return BytesItem(RawSample(key or where, bytes(image), caption or "", dict(info), key=key))
    if not image:
        status = row.get("status")
        detail = f"{where}: no image" + (f" (status {status}: {row.get('error_message')})" if status else "")
        return BytesItem(RawSample(key or where, reject="missing_image", detail=detail))
    rel = os.path.relpath(path.parent / str(image), root)  # from the source folder, split folders included
    return FileItem(source_id=rel, root=root, image_path=root / rel, caption_path=None,
                    caption=caption or "", key=key or str(Path(rel).with_suffix("")), info=info)


def tar_urls(source: str) -> list[str]:
    """Tar files named by a path, brace pattern, folder of tars, or an fsspec URL of any of those."""
    if is_url(source) and "{" not in source and not _is_tar(source):
        import fsspec

        fs, path = fsspec.core.url_to_fs(source)
        protocol = source.split("://", 1)[0]
        return sorted(f"{protocol}://{p}" if not p.startswith(f"{protocol}://") else p
                      for p in fs.ls(path, detail=False) if _is_tar(p))
    if not is_url(source) and Path(source).is_dir():
        return sorted(str(p) for p in Path(source).iterdir() if p.is_file() and _is_tar(p.name))
    return list(braceexpand.braceexpand(source))


def _open(url: str):
    if is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def webdataset_items(source: str) -> Iterator[Item]:
    """The samples of every tar of `source`, tar after tar (`tar_items`)."""
    for url in tar_urls(source):
        yield from tar_items(url)


def tar_items(url: str) -> Iterator[Item]:
    """Stream one tar member by member (gzip too), grouping consecutive members by key (as webdataset does).

    An unreadable tar, or the sample a truncated tar breaks off in, becomes a rejected item; when the producer
    said how many samples the tar holds (img2dataset's `NAME_stats.json`), every sample lost after the break
    is counted too."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    done, last = 0, None
    try:
        with _open(url) as f:
            for last, files in iter_tar(f):
                yield _tar_sample(name, last, files)
                done += 1
    except OSError as e:  # opening it failed
        yield from _lost(name, None, "unreadable", f"{url}: {e}", 1)
        return
    except TarBroken as e:
        reason = "truncated" if e.key is not None else "unreadable"
        lost = max(1, _producer_count(url) - done) if reason == "truncated" else 1
        yield from _lost(name, e.key, reason, f"{url}: {e.__cause__}", lost)
        return
    # tarfile ends a stream cut inside a header quietly, as if the archive were shorter
    lost = max(_producer_count(url) - done, 0 if _ends_whole(url) else 1)
    if lost:
        yield from _lost(name, last, "truncated", f"{url}: the tar ends early after {done} samples", lost)


def _lost(tar_name: str, key: str | None, reason: str, detail: str, count: int) -> Iterator[BytesItem]:
    """`count` rejected items for samples a broken tar lost (each counts once in the manifest)."""
    for i in range(count):
        yield BytesItem(RawSample(f"{tar_name}:{key or '?'}" + (f"+{i}" if i else ""), reject=reason,
                                  detail=detail + (f" ({count} samples lost)" if count > 1 else "")))


def _ends_whole(url: str) -> bool:
    """A local uncompressed tar ends on a block boundary with its end-of-archive zero blocks (others: assumed)."""
    if is_url(url) or not url.endswith(".tar"):
        return True
    size = os.path.getsize(url)
    if size % 512 or size < 1024:
        return False
    with open(url, "rb") as f:
        f.seek(size - 1024)
        return not f.read(1024).strip(b"\0")


def _producer_count(url: str) -> int:
    """Samples img2dataset says a local tar holds (`successes` in its `NAME_stats.json`), else 0 (unknown)."""
    stats = Path(url.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar") + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"]) if not is_url(url) and stats.is_file() else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _tar_sample(tar_name: str, key: str, files: dict[str, bytes]) -> BytesItem:
    source_id = f"{tar_name}:{key}"
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    if image_ext is None:
        return BytesItem(RawSample(source_id, reject="missing_image", detail=f"members: {', '.join(files)}"))
    info = {}
    if "json" in files:
        try:
            info = json.loads(files["json"])
        except ValueError:
            info = {}
    if "txt" not in files:
        return BytesItem(RawSample(source_id, reject="no_caption", detail="no .txt member"))
    caption, utf8 = decode_caption(files["txt"])
    return BytesItem(RawSample(source_id, files[image_ext], caption, info, files.get("panoptic.png"),
                               key=Path(key).name, caption_utf8=utf8))


def iter_items(kind: str, source: str | None, image_column: str | None, caption_column: str | None,
               key_column: str, demo_num_samples: int, demo_image_size: int, demo_seed: int) -> Iterator[Item]:
    """Items of a source, in a deterministic order."""
    if kind == "demo":
        return (DemoItem(i, demo_image_size, demo_seed) for i in range(demo_num_samples))
    if source is None:
        raise SourceError(f"source kind {kind!r} needs a source path")
    if kind == "folder":
        return folder_items(Path(source))
    if kind == "metadata":
        return metadata_items(Path(source), image_column, caption_column, key_column)
    return webdataset_items(source)


def fingerprint(kind: str, source: str | None) -> list:
    """What identifies the source's content cheaply: (path, size, mtime) of every file it reads (for URLs, the
    file system's own content key: an ETag, a checksum or size and mtime)."""
    if kind == "demo" or source is None:
        return []
    if kind == "webdataset" and any(is_url(u) for u in tar_urls(source)):
        import fsspec

        out = []
        for url in tar_urls(source):
            fs, path = fsspec.core.url_to_fs(url)
            try:
                out.append([url, fs.ukey(path)])
            except (OSError, NotImplementedError):
                out.append([url, None])
        return out
    if kind == "webdataset":
        paths = [Path(u) for u in tar_urls(source)]
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
