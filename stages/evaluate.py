"""Stage `evaluate`: samples and metrics from every trained artifact (built by issue #9)."""

from __future__ import annotations

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig

NAME = "evaluate"
INPUTS: tuple[str, ...] = ("shards", "vqgan-low", "vqgan-high", "tokens", "base", "superres", "decoder")
OUTPUTS: tuple[str, ...] = ("report",)
CODE_VERSION = "0"


def config_of(config: PipelineConfig) -> dict:
    """The resolved config this stage's outputs depend on."""
    return config.evaluate.model_dump(mode="json")


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> list[Artifact]:
    """Not built yet."""
    raise NotImplementedError(f"stage '{NAME}' is not implemented yet: issue #9 builds it")
