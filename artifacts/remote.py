"""A store whose truth lives at an fsspec URL (s3://, gs://, az://, memory://...), read through a local mirror.

Stages read inputs as local files (tarfile, Ray Data), so every artifact a run
touches is pulled into a local cache (`$MUSE_CACHE`, default ~/.cache/muse/<url hash>)
and checked against its manifest's sha256 before use. Object stores have no
atomic directory rename, so a commit uploads every file first and `_manifest.json`
last: a version without a manifest is invisible to readers, and a crash mid-upload
leaves nothing that looks complete. `.work/` checkpoints stay on the local disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from .manifest import MANIFEST_NAME
from .store import (
    _KIND_RE,
    _VERSION_RE,
    Artifact,
    ArtifactError,
    ArtifactStore,
    ArtifactWriter,
    MissingArtifact,
    Problem,
    read_manifest,
)


def is_remote(location: str | os.PathLike) -> bool:
    """URLs with a scheme other than file:// name remote stores."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


class RemoteArtifactStore(ArtifactStore):
    """ArtifactStore semantics over an fsspec URL; `root` is the local mirror."""

    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.remote_root = fsspec.core.url_to_fs(self.url)
        if cache_dir is None:
            base = Path(os.environ.get("MUSE_CACHE", "~/.cache/muse")).expanduser()
            cache_dir = base / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        super().__init__(cache_dir)

    def _r(self, *parts: str) -> str:
        return "/".join([self.remote_root.rstrip("/"), *parts])

    # ------------------------------------------------------------------ reading

    def _refresh(self, kind: str | None = None) -> None:
        """Mirror every remote manifest (not the files) so listing works locally."""
        pattern = self._r(kind or "*", "*", MANIFEST_NAME)
        for remote in self.fs.glob(pattern):
            k, v = remote.rstrip("/").split("/")[-3:-1]
            if not _KIND_RE.match(k):
                continue
            local = self.root / k / v / MANIFEST_NAME
            data = self.fs.cat_file(remote)
            if not local.is_file() or local.read_bytes() != data:
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)

    def kinds(self) -> list[str]:
        self._refresh()
        return super().kinds()

    def list(self, kind: str | None = None) -> list[Artifact]:
        """Committed artifacts from their manifests alone: files are pulled by `get`."""
        self._refresh(kind)
        out = []
        for mpath in self.root.glob(f"{kind or '*'}/*/{MANIFEST_NAME}"):
            k, v = mpath.parent.parent.name, mpath.parent.name
            if _KIND_RE.match(k) and _VERSION_RE.match(v) and self.has(k, v):
                out.append(Artifact(mpath.parent, read_manifest(mpath.read_text(), str(mpath))))
        return sorted(out, key=lambda a: (a.kind, a.manifest.seq))

    def get(self, kind: str, version: str | None = None) -> Artifact:
        """Resolve like a local store, then pull the files into the mirror."""
        found = self._find(kind, version)
        return self._load(found.kind, found.version)

    @property
    def location(self) -> str:
        return self.url

    def has(self, kind: str, version: str) -> bool:
        return self.fs.exists(self._r(kind, version, MANIFEST_NAME))

    def latest_version(self, kind: str) -> str | None:
        pointer = self._r(kind, "latest")
        return self.fs.cat_file(pointer).decode().strip() if self.fs.exists(pointer) else None

    def _load(self, kind: str, version: str) -> Artifact:
        """Pull the artifact's files into the mirror (verifying sha256), then load it as a local one."""
        remote_manifest = self._r(kind, version, MANIFEST_NAME)
        if not self.fs.exists(remote_manifest):
            raise MissingArtifact(f"no artifact {kind}:{version} in {self.url}")
        manifest = read_manifest(self.fs.cat_file(remote_manifest), remote_manifest)
        local = self.root / kind / version
        for entry in manifest.files:
            path = local / entry.path
            if path.is_file() and path.stat().st_size == entry.size:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            self.fs.get_file(self._r(kind, version, entry.path), str(tmp))
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if digest != entry.sha256:
                tmp.unlink()
                raise ArtifactError(f"{self.url}/{kind}/{version}/{entry.path}: sha256 mismatch while pulling")
            os.replace(tmp, path)
        (local / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        return Artifact(local, manifest)

    def verify(self, kind: str | None = None) -> tuple[int, list[Problem]]:
        """Re-hash every file at the remote root (the truth), streaming."""
        checked, problems = 0, []
        for art in self.list(kind):
            listed = {f.path for f in art.manifest.files}
            prefix = self._r(art.kind, art.version) + "/"
            present = {p[len(prefix):] for p in self.fs.find(prefix)} - {MANIFEST_NAME}
            for rel in sorted(present - listed):
                problems.append(Problem(art.ref, rel, "file not in manifest"))
            for entry in art.manifest.files:
                checked += 1
                if entry.path not in present:
                    problems.append(Problem(art.ref, entry.path, "missing"))
                    continue
                h = hashlib.sha256()
                with self.fs.open(prefix + entry.path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                if h.hexdigest() != entry.sha256:
                    problems.append(Problem(art.ref, entry.path, "sha256 mismatch"))
        return checked, problems

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def create(self, kind: str, **kwargs) -> Iterator[ArtifactWriter]:
        """Commit into the mirror as a local store does, then upload: files first, manifest last."""
        with super().create(kind, **kwargs) as writer:
            yield writer
        art = writer.artifact
        prefix = self._r(art.kind, art.version)
        if self.fs.exists(prefix + "/" + MANIFEST_NAME):
            self.fs.rm_file(prefix + "/" + MANIFEST_NAME)  # a forced rerun: invisible until re-committed
            for stale in self.fs.find(prefix):
                self.fs.rm_file(stale)
        for entry in art.manifest.files:
            self.fs.put_file(str(art.path / entry.path), f"{prefix}/{entry.path}")
        self.fs.put_file(str(art.path / MANIFEST_NAME), f"{prefix}/{MANIFEST_NAME}")
        self._set_latest(art.kind, art.version)

    def _set_latest(self, kind: str, version: str) -> None:
        super()._set_latest(kind, version)
        if self.fs.exists(self._r(kind, version, MANIFEST_NAME)):
            self.fs.pipe_file(self._r(kind, "latest"), (version + "\n").encode())


def open_store(location: str | os.PathLike | None = None) -> ArtifactStore:
    """The store at `location` (else $MUSE_STORE, else ./store): local path or fsspec URL."""
    text = str(location or os.environ.get("MUSE_STORE") or "store")
    return RemoteArtifactStore(text) if is_remote(text) else ArtifactStore(text)
