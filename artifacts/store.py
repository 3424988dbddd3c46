"""The versioned artifact store: `STORE/KIND/VERSION/` directories with a manifest.

Layout under the root:
    KIND/VERSION/_manifest.json + files  a committed artifact (never modified in place)
    KIND/latest                          text file: the version `latest` resolves to
    .tmp/                                artifacts being written; renamed into place on commit
    .work/KIND/VERSION/                  scratch and checkpoints of resumable stages

Commit is atomic: files are written under `.tmp/`, hashed, fsynced, then the
directory is renamed into place and only then does `latest` move. A stage that
raises leaves nothing behind that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import ValidationError

from muse.errors import UserError

from .manifest import LEGACY_MANIFEST_NAME, MANIFEST_NAME, FileEntry, Manifest, content_version, sha256_file

# Stage-written previews: PNG files under this folder of an artifact are shown on its Prefect page.
PREVIEW_DIR = "previews"

_VERSION_RE = re.compile(r"^[0-9a-f]{6,64}$")
_HOST = socket.gethostname().replace("-", "_")
_OWNER_RE = re.compile(r"-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) of files this process hashed and found good
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class ArtifactError(UserError, RuntimeError):
    """A store problem a user can act on; the message says what and where."""


class MissingArtifact(ArtifactError):
    """The asked-for artifact is not in the store."""


@dataclass(frozen=True)
class Artifact:
    """A committed artifact: its directory and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def ref(self) -> str:
        return self.manifest.ref

    def file(self, name: str) -> Path:
        """Path of one of the artifact's files; an error naming the artifact when absent."""
        p = self.path / name
        if not p.exists():
            raise ArtifactError(f"{self.ref}: has no file {name!r}")
        return p


@dataclass
class ArtifactWriter:
    """An artifact being written: put files under `path`, fill `metrics` and `details`."""

    kind: str
    version: str
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    artifact: Artifact | None = None  # set once committed


@dataclass(frozen=True)
class Problem:
    """One verification failure."""

    ref: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.path}: {self.reason}"


def _owner() -> str:
    """Who writes a `.tmp/` entry (host and pid), so a dead writer's leftovers can be told from a live one's."""
    return f"{_HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root so a rename publishes durable bytes."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _list_files(root: Path) -> list[Path]:
    """An artifact directory's files, its manifest excepted."""
    manifests = {root / MANIFEST_NAME, root / LEGACY_MANIFEST_NAME}
    return sorted(p for p in root.rglob("*") if p.is_file() and p not in manifests)


def read_manifest(text: str | bytes, where: str) -> Manifest:
    """A manifest from its JSON; an ArtifactError naming `where` and the first bad field."""
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(f"{where}: invalid manifest field {loc}: {first['msg']}") from None


def manifest_path(artifact_dir: Path) -> Path:
    """The manifest of an artifact directory: `_manifest.json`, or the name stores written before it used."""
    legacy = artifact_dir / LEGACY_MANIFEST_NAME
    return legacy if not (artifact_dir / MANIFEST_NAME).is_file() and legacy.is_file() else artifact_dir / MANIFEST_NAME


class ArtifactStore:
    """A local artifact store rooted at a directory (created on first write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    # ------------------------------------------------------------------ reading

    def kinds(self) -> list[str]:
        """Kinds that have at least one committed artifact."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _KIND_RE.match(p.name) and self.list(p.name))

    def _load(self, kind: str, version: str) -> Artifact:
        path = self.root / kind / version
        mpath = manifest_path(path)
        try:
            manifest = read_manifest(mpath.read_text(), str(mpath))
        except FileNotFoundError:
            raise MissingArtifact(f"no artifact {kind}:{version} in {self.root}") from None
        return Artifact(path, manifest)

    def list(self, kind: str | None = None) -> list[Artifact]:
        """Committed artifacts of one kind (or all), oldest first."""
        kinds = [kind] if kind else self.kinds()
        out = []
        for k in kinds:
            kdir = self.root / k
            if not kdir.is_dir():
                continue
            for vdir in kdir.iterdir():
                if vdir.is_dir() and _VERSION_RE.match(vdir.name) and manifest_path(vdir).is_file():
                    out.append(self._load(k, vdir.name))
        return sorted(out, key=lambda a: (a.kind, a.manifest.seq))

    def has(self, kind: str, version: str) -> bool:
        return manifest_path(self.root / kind / version).is_file()

    def latest_version(self, kind: str) -> str | None:
        pointer = self.root / kind / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    @property
    def location(self) -> str:
        """Where the store lives, as users pass it to --store."""
        return str(self.root)

    def get(self, kind: str, version: str | None = None) -> Artifact:
        """An artifact by kind and version, `vN` sequence number, or `latest` (the default)."""
        return self._find(kind, version)

    def _find(self, kind: str, version: str | None) -> Artifact:
        if version in (None, "", "latest"):
            latest = self.latest_version(kind)
            if latest is None:
                raise MissingArtifact(f"no {kind!r} artifact in {self.root}")
            version = latest
        if re.fullmatch(r"v\d+", version):
            for a in self.list(kind):
                if a.manifest.seq == int(version[1:]):
                    return a
            raise MissingArtifact(f"no {kind} {version} in {self.root}")
        matches = [a for a in self.list(kind) if a.version.startswith(version)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise MissingArtifact(f"no artifact {kind}:{version} in {self.root}")
        raise ArtifactError(f"{kind}:{version} is ambiguous: {', '.join(a.version for a in matches)}")

    def resolve(self, ref: str) -> Artifact:
        """`KIND`, `KIND:VERSION`, `KIND:vN` or `KIND:latest` -> Artifact."""
        kind, _, version = ref.partition(":")
        return self.get(kind, version or None)

    def upstream(self, artifact: Artifact) -> list[tuple[str, str, Manifest | None]]:
        """Every artifact `artifact` was made from, directly or not, once each, nearest first, as
        (kind, version, manifest); the manifest is None for one missing from this store."""
        found, todo, seen = [], sorted(artifact.manifest.inputs.items()), set()
        while todo:
            kind, version = todo.pop(0)
            if (kind, version) in seen:
                continue
            seen.add((kind, version))
            try:
                m = self.get(kind, version).manifest
            except MissingArtifact:
                found.append((kind, version, None))
                continue
            found.append((kind, version, m))
            todo += sorted(m.inputs.items())
        return found

    def made_from(self, artifact: Artifact) -> list[str]:
        """`upstream` as lines: `base v1 (adf3…) [train-base] from tokens`."""
        return [f"{kind}:{version} (missing from this store)" if m is None else
                f"{m.label} [{m.stage}] from {', '.join(sorted(m.inputs)) or 'the source'}"
                for kind, version, m in self.upstream(artifact)]

    def lineage(self, artifact: Artifact, depth: int = 0, seen: set[str] | None = None) -> list[str]:
        """Indented lines: the artifact, then its inputs recursively; an artifact already shown (the DAG shares
        inputs: every stage reads `shards`) is named again without its own inputs."""
        seen = set() if seen is None else seen
        label = f"{'  ' * depth}{artifact.manifest.label}  [{artifact.manifest.stage}]"
        if artifact.ref in seen:
            return [label + "  (inputs above)"] if artifact.manifest.inputs else [label]
        seen.add(artifact.ref)
        lines = [label]
        for kind, version in sorted(artifact.manifest.inputs.items()):
            try:
                lines += self.lineage(self._find(kind, version), depth + 1, seen)
            except MissingArtifact:
                lines.append(f"{'  ' * (depth + 1)}{kind}:{version}  (missing from store)")
        return lines

    def _problems(self, art: Artifact, cached: bool) -> list[Problem]:
        """Files of one artifact that differ from its manifest. `cached`: skip a file this process already
        hashed while its size and mtime are unchanged."""
        listed = {f.path: f for f in art.manifest.files}
        present = {p.relative_to(art.path).as_posix() for p in _list_files(art.path)}
        problems = [Problem(art.ref, rel, "file not in manifest") for rel in sorted(present - set(listed))]
        for rel, entry in sorted(listed.items()):
            p = art.path / rel
            if rel not in present:
                problems.append(Problem(art.ref, rel, "missing"))
                continue
            st = p.stat()
            stamp = (str(p), st.st_size, st.st_mtime_ns, entry.sha256)
            if st.st_size != entry.size:
                problems.append(Problem(art.ref, rel, f"size {st.st_size} != {entry.size}"))
            elif not (cached and stamp in _VERIFIED):
                if sha256_file(p) != entry.sha256:
                    problems.append(Problem(art.ref, rel, "sha256 mismatch"))
                else:
                    _VERIFIED.add(stamp)
        return problems

    def check(self, art: Artifact) -> Artifact:
        """The artifact, once its files match its manifest (hashed once per process while unchanged); an
        ArtifactError naming the first bad file otherwise, so tampered or rotted data is never used as good."""
        problems = self._problems(art, cached=True)
        if problems:
            more = f" (and {len(problems) - 1} more; `muse artifacts verify`)" if len(problems) > 1 else ""
            raise ArtifactError(f"{art.path / problems[0].path}: {problems[0].reason}{more}")
        return art

    def verify(self, kind: str | None = None) -> tuple[int, list[Problem]]:
        """Re-hash every file of every artifact and check every `latest` pointer; returns (files checked,
        problems), reading on past an unreadable manifest."""
        checked, problems = 0, []
        kinds = [kind] if kind else sorted(p.name for p in self.root.iterdir() if p.is_dir() and _KIND_RE.match(p.name)) \
            if self.root.is_dir() else []
        for k in kinds:
            kdir = self.root / k
            versions = sorted(v.name for v in kdir.iterdir() if v.is_dir() and _VERSION_RE.match(v.name)
                              and manifest_path(v).is_file()) if kdir.is_dir() else []
            for v in versions:
                try:
                    art = self._load(k, v)
                except ArtifactError as e:
                    problems.append(Problem(f"{k}:{v}", MANIFEST_NAME, str(e)))
                    continue
                checked += len(art.manifest.files)
                problems += self._problems(art, cached=False)
            latest = self.latest_version(k)
            if latest is not None and latest not in versions:
                problems.append(Problem(k, "latest", f"points at {latest!r}, which is not an artifact of this kind"))
        return checked, problems

    # ------------------------------------------------------------------ writing

    @staticmethod
    def version_of(stage: str, config: Any, inputs: dict[str, str], code_version: str) -> str:
        """The version a stage run with these facts produces (see `content_version`)."""
        return content_version(stage, config, inputs, code_version)

    def work_dir(self, kind: str, version: str) -> Path:
        """Scratch/checkpoint directory of a resumable stage; survives crashes, not commits of `force`."""
        path = self.root / ".work" / kind / version
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cache_dir(self, name: str) -> Path:
        """`.cache/NAME/`: figures derived from artifacts that are costly to recompute (FID reference statistics);
        keyed by what they derive from, so deleting it loses only time."""
        return self.root / ".cache" / name

    def clear_work(self, kind: str, version: str) -> None:
        shutil.rmtree(self.root / ".work" / kind / version, ignore_errors=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def create(
        self,
        kind: str,
        *,
        stage: str,
        config: Any,
        inputs: dict[str, str],
        code_version: str,
    ) -> Iterator[ArtifactWriter]:
        """Write a new artifact: yields a writer whose `path` is a private temp dir.

        On normal exit the files are hashed, the manifest written, everything
        fsynced and the directory renamed to `KIND/VERSION`; then `latest` moves.
        On an exception the temp dir is removed and nothing else changes.
        An existing artifact of the same version (a forced rerun) is swapped out
        whole, by two renames, and the new one gets the next sequence number.
        """
        if not _KIND_RE.match(kind):
            raise ArtifactError(f"invalid artifact kind {kind!r}: use lowercase letters, digits and '-'")
        version = self.version_of(stage, config, inputs, code_version)
        self.remove_orphans()
        tmp = self.root / ".tmp" / f"{kind}-{version}-{_owner()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        writer = ArtifactWriter(kind=kind, version=version, path=tmp)
        try:
            yield writer
            files = [
                FileEntry(path=p.relative_to(tmp).as_posix(), size=p.stat().st_size, sha256=sha256_file(p))
                for p in _list_files(tmp)
            ]
            with self._lock():
                target = self.root / kind / version
                seq = max((a.manifest.seq for a in self.list(kind)), default=0) + 1
                manifest = Manifest(
                    kind=kind, version=version, seq=seq, stage=stage, config=config, inputs=inputs,
                    code_version=code_version, metrics=writer.metrics, details=writer.details, files=files,
                )
                (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
                _fsync_tree(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    old = self.root / ".tmp" / f"replaced-{kind}-{version}-{_owner()}-{uuid.uuid4().hex[:8]}"
                    os.rename(target, old)
                    os.rename(tmp, target)
                    shutil.rmtree(old)
                else:
                    os.rename(tmp, target)
                self._set_latest(kind, version)
                writer.artifact = Artifact(target, manifest)
            self.clear_work(kind, version)  # its checkpoints and scratch went into the artifact or are spent
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove_orphans(self) -> list[Path]:
        """Remove `.tmp/` entries of writers on this host that are no longer running (a killed commit); returns
        what was removed. Entries of live processes and of other hosts are left alone."""
        removed = []
        tmp_root = self.root / ".tmp"
        for entry in tmp_root.iterdir() if tmp_root.is_dir() else []:
            owner = _OWNER_RE.search(entry.name)
            if owner and owner["host"] == _HOST and not _alive(int(owner["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    def gc(self) -> list[Path]:
        """Orphaned `.tmp/` entries and `.work/` dirs of versions already committed; returns what was removed."""
        removed = self.remove_orphans()
        work = self.root / ".work"
        for kdir in sorted(work.iterdir()) if work.is_dir() else []:
            for vdir in sorted(kdir.iterdir()) if kdir.is_dir() else []:
                if self.has(kdir.name, vdir.name):
                    shutil.rmtree(vdir, ignore_errors=True)
                    removed.append(vdir)
        return removed

    @contextlib.contextmanager
    def producing(self, stage: str, version: str) -> Iterator[None]:
        """Held while one process checks for, produces and commits a stage's outputs at a version: a second
        identical run waits here, then finds them up to date instead of training them again beside the first."""
        path = self.root / ".locks" / f"{stage}-{version}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a")
        except OSError:  # a read-only store: nothing can be produced in it, so there is nothing to wait for
            yield
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _set_latest(self, kind: str, version: str) -> None:
        pointer = self.root / kind / "latest"
        tmp = pointer.with_name(f".latest-{uuid.uuid4().hex[:8]}")
        tmp.write_text(version + "\n")
        os.replace(tmp, pointer)

    def set_latest(self, kind: str, version: str) -> None:
        """Point `latest` at an existing version (a skipped, up-to-date run does this too); writes nothing when it
        already does, so an up-to-date rerun works on a read-only store."""
        if not self.has(kind, version):
            raise MissingArtifact(f"no artifact {kind}:{version} in {self.root}")
        if self.latest_version(kind) == version:
            return
        with self._lock():
            self._set_latest(kind, version)

