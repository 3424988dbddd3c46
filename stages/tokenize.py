"""Stage `tokenize`: tokens and text embeddings into parquet (built by issue #6)."""

from __future__ import annotations

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig

NAME = "tokenize"
INPUTS: tuple[str, ...] = ("shards", "segments", "vqgan-low", "vqgan-high", "vqseg")
OUTPUTS: tuple[str, ...] = ("tokens",)
CODE_VERSION = "0"


def config_of(config: PipelineConfig) -> dict:
    """The resolved config this stage's outputs depend on."""
    return config.tokenize.model_dump(mode="json")


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> list[Artifact]:
    """Not built yet."""
    raise NotImplementedError(f"stage '{NAME}' is not implemented yet: issue #6 builds it")
