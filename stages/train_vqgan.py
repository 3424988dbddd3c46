"""Stage `train-vqgan`: image tokenizers and the scene tokenizer (built by issue #5)."""

from __future__ import annotations

from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig

NAME = "train-vqgan"
INPUTS: tuple[str, ...] = ("shards", "segments")
OUTPUTS: tuple[str, ...] = ("vqgan-low", "vqgan-high", "vqseg")
CODE_VERSION = "0"


def config_of(config: PipelineConfig) -> dict:
    """The resolved config this stage's outputs depend on."""
    return config.train_vqgan.model_dump(mode="json")


def run(config: PipelineConfig, inputs: dict[str, Artifact], store: ArtifactStore) -> list[Artifact]:
    """Not built yet."""
    raise NotImplementedError(f"stage '{NAME}' is not implemented yet: issue #5 builds it")
