"""What a stage's outputs are versioned on: one helper the flow and the stages share.

A stage module may define `outputs(config, input_versions) -> {kind: OutputSpec}` when its
outputs read different parts of the config or different inputs (train-vqgan: each tokenizer
hashes only its own knobs, and the image tokenizers do not read `segments`); otherwise every
output is versioned on `config_of(config)` and all the stage's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from muse.artifacts.manifest import content_version


@dataclass(frozen=True)
class OutputSpec:
    """What one output artifact's version hashes, and what its manifest records as config and inputs."""

    config: Any
    inputs: dict[str, str]

    def create_kwargs(self, stage: str, code_version: str) -> dict:
        """`ArtifactStore.create` keyword arguments that commit the output at exactly `version`."""
        return {"stage": stage, "config": self.config, "inputs": self.inputs, "code_version": code_version}

    def version(self, stage: str, code_version: str) -> str:
        return content_version(stage, self.config, self.inputs, code_version)


def output_specs(stage: ModuleType, config, input_versions: dict[str, str]) -> dict[str, OutputSpec]:
    """Each output kind of `stage` with what its version hashes."""
    own = getattr(stage, "outputs", None)  # optional in the stage protocol
    if own is not None:
        return own(config, input_versions)
    return {kind: OutputSpec(stage.config_of(config), dict(input_versions)) for kind in stage.OUTPUTS}


def output_versions(stage: ModuleType, config, input_versions: dict[str, str]) -> dict[str, str]:
    """Each output kind's version: what the stage would commit it at."""
    specs = output_specs(stage, config, input_versions)
    return {kind: spec.version(stage.NAME, stage.CODE_VERSION) for kind, spec in specs.items()}
