"""Reading webdataset tars: one key rule and one reader for every stage.

A member `dir/cat.seg.png` belongs to sample `dir/cat` under the ending `seg.png` (webdataset's
rule: the key ends at the file name's first dot; directories stay in the key), and a sample is
its consecutive members with one key. The reader streams (`r|*`: plain or gzip, a path, a URL's
file object, or any readable binary file), so a tar is read once, front to back.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator


class TarBroken(Exception):
    """The tar could not be read to its end; `key` is the sample being read when it broke off (None: before
    the first member), `samples` how many whole samples came before it. The cause is chained."""

    def __init__(self, key: str | None, samples: int):
        super().__init__(f"tar broken off after {samples} samples")
        self.key, self.samples = key, samples


def member_key(name: str) -> tuple[str, str]:
    """("dir/cat", "seg.png") for "dir/cat.seg.png"; the ending is lower-cased."""
    path = PurePosixPath(name)
    base, _, ending = path.name.partition(".")
    return str(path.parent / base), ending.lower()


def iter_tar(source: str | Path | BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ending: bytes}) per sample, in tar order; raises TarBroken when the tar breaks off."""
    key, files, samples = None, {}, 0
    try:
        with (tarfile.open(source, mode="r|*") if isinstance(source, (str, Path))
              else tarfile.open(fileobj=source, mode="r|*")) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                member_sample, ending = member_key(member.name)
                if member_sample != key and files:
                    yield key, files
                    files, samples = {}, samples + 1
                key = member_sample
                files[ending] = tf.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError) as e:
        raise TarBroken(key, samples) from e
    if files:
        yield key, files


def tar_keys(path: str | Path) -> list[str]:
    """Sample keys of a local tar in order, from its headers only."""
    with tarfile.open(path) as tf:
        return list(dict.fromkeys(member_key(m.name)[0] for m in tf if m.isfile()))


def has_ending(path: str | Path, ending: str) -> bool:
    """Whether any sample of a local tar has a member with this ending (headers only)."""
    with tarfile.open(path) as tf:
        return any(m.isfile() and member_key(m.name)[1] == ending for m in tf)
