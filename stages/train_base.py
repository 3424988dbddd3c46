"""Stage `train-base`: the text-conditioned masked transformer (built by issue #7)."""

from __future__ import annotations

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig

NAME = "train-base"
INPUTS: tuple[str, ...] = ("tokens",)
OUTPUTS: tuple[str, ...] = ("base",)
CODE_VERSION = "0"


def config_of(config: PipelineConfig) -> dict:
    """The resolved config this stage's outputs depend on."""
    return config.train_base.model_dump(mode="json")


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> list[Artifact]:
    """Not built yet."""
    raise NotImplementedError(f"stage '{NAME}' is not implemented yet: issue #7 builds it")
