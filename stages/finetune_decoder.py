"""Stage `finetune-decoder`: a larger decoder for the frozen tokenizer (built by issue #8)."""

from __future__ import annotations

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig

NAME = "finetune-decoder"
INPUTS: tuple[str, ...] = ("shards", "vqgan-high")
OUTPUTS: tuple[str, ...] = ("decoder",)
CODE_VERSION = "0"


def config_of(config: PipelineConfig) -> dict:
    """The resolved config this stage's outputs depend on."""
    return config.finetune_decoder.model_dump(mode="json")


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> list[Artifact]:
    """Not built yet."""
    raise NotImplementedError(f"stage '{NAME}' is not implemented yet: issue #8 builds it")
