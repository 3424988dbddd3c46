"""Stage `segment`: Make-A-Scene-style scene maps with Ray (built by issue #4)."""

from __future__ import annotations

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig

NAME = "segment"
INPUTS: tuple[str, ...] = ("shards",)
OUTPUTS: tuple[str, ...] = ("segments",)
CODE_VERSION = "0"


def config_of(config: PipelineConfig) -> dict:
    """The resolved config this stage's outputs depend on."""
    return config.segment.model_dump(mode="json")


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> list[Artifact]:
    """Not built yet."""
    raise NotImplementedError(f"stage '{NAME}' is not implemented yet: issue #4 builds it")
