"""The manifest of one artifact, and the hashes that make versions content-derived.

A version is a hash of what produced the artifact: stage name, the resolved
config the stage depends on, the versions of its inputs and the stage's code
version. Rerunning with the same four gives the same version, so the run finds
the artifact and skips; changing any one gives a new version beside the old.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# `_`-prefixed: dataset readers (pyarrow, pandas, duckdb, Hugging Face datasets) skip it beside parquet files.
MANIFEST_NAME = "_manifest.json"
LEGACY_MANIFEST_NAME = "manifest.json"  # what stores written before the rename hold; still read
VERSION_LENGTH = 12


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large shards stay out of memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text, hence equal hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_version(stage: str, config: Any, inputs: dict[str, str], code_version: str) -> str:
    """The version of a stage's outputs: hash(stage, resolved config, input versions, code version)."""
    payload = canonical_json({"stage": stage, "config": config, "inputs": inputs, "code": code_version})
    return hashlib.sha256(payload.encode()).hexdigest()[:VERSION_LENGTH]


class FileEntry(BaseModel):
    """One file of an artifact, relative to the artifact directory."""

    path: str
    size: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside_the_artifact(cls, path: str) -> str:
        # A manifest from a shared store names the files a reader writes into its mirror: none may leave it.
        parts = path.split("/")
        if not path or path.startswith("/") or "\\" in path or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"file path {path!r} is not a plain relative path inside the artifact")
        return path


class Manifest(BaseModel):
    """What an artifact is, where it came from and what it holds (`_manifest.json`)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="Artifact kind, e.g. 'shards', 'vqgan-low'.")
    version: str = Field(description="Content-derived version (hex).")
    seq: int = Field(description="Human sequence number per kind: v1, v2, ...")
    stage: str = Field(description="Stage that produced it.")
    config: dict[str, Any] = Field(description="The resolved config the stage depended on.")
    inputs: dict[str, str] = Field(description="Input artifacts: kind -> version.")
    code_version: str = Field(description="The producing stage's code version.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Figures a person compares across versions.")
    details: dict[str, Any] = Field(default_factory=dict, description="Stage-specific facts: schema, label space, ...")
    files: list[FileEntry] = Field(default_factory=list, description="Every file but the manifest, with hashes.")
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    status: Literal["complete"] = "complete"

    @property
    def ref(self) -> str:
        """`kind:version`, the form users type."""
        return f"{self.kind}:{self.version}"

    @property
    def label(self) -> str:
        """`kind v3 (abc123...)`, the form logs show."""
        return f"{self.kind} v{self.seq} ({self.version})"
