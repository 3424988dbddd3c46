"""Stage `shard`: placeholder until issue #3."""
from __future__ import annotations
from muse.artifacts.store import Artifact, ArtifactStore
from muse.config import PipelineConfig
NAME = "shard"
INPUTS: tuple[str, ...] = ()
OUTPUTS: tuple[str, ...] = ("shards",)
CODE_VERSION = "0"
def config_of(config: PipelineConfig) -> dict:
    return config.shard.model_dump(mode="json")
def run(config, inputs, store):
    raise NotImplementedError(f"stage '{NAME}' is not implemented yet: issue #3 builds it")
