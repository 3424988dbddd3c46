"""The stage protocol: what a stage's outputs are versioned on, and the context its `run` gets.

A stage module defines NAME, INPUTS, OUTPUTS, CODE_VERSION, `config_of(config)` and
`run(ctx: StageContext)`. The runner (the flow, or `execute` outside it) builds one
`StageContext`: the config, the input artifacts, the store, each output's version, the
device and a logger; the stage commits each output with `ctx.commit(kind)`, which writes it
at exactly the version the runner derived, with its training record when given one.

A stage module may define `outputs(config, input_versions) -> {kind: OutputSpec}` when its
outputs read different parts of the config or different inputs (train-vqgan: each tokenizer
hashes only its own knobs, and the image tokenizers do not read `segments`); otherwise every
output is versioned on `config_of(config)` and all the stage's inputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch

from muse.artifacts.manifest import content_version
from muse.artifacts.store import Artifact, ArtifactStore, ArtifactWriter


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


CONTINUE_DIR = "continue"  # under .work/KIND/: the last checkpoint of each committed run, by config less its length


def _without_steps(config: Any) -> Any:
    """`config` with the `steps` of every `train` section removed: what runs that differ only in length share."""
    if isinstance(config, dict):
        return {k: _without_steps({n: x for n, x in v.items() if n != "steps"} if k == "train" and isinstance(v, dict)
                                  else v) for k, v in config.items()}
    return config


def _train_sections(config: Any) -> list[dict]:
    if not isinstance(config, dict):
        return []
    own = [config["train"]] if isinstance(config.get("train"), dict) else []
    return own + [t for k, v in config.items() if k != "train" for t in _train_sections(v)]


def default_device() -> torch.device:
    """Where a stage computes: the first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class StageContext:
    """Everything one run of a stage reads, built once by the runner."""

    stage: str  # the stage's NAME
    code_version: str
    config: Any  # the whole PipelineConfig; a stage reads its own section and what it shares
    inputs: dict[str, Artifact]
    store: ArtifactStore
    outputs: dict[str, OutputSpec]
    device: torch.device
    continued: dict[str, str] = field(default_factory=dict)  # kind -> the shorter run it continues, for lineage

    @classmethod
    def of(cls, stage: ModuleType, config, inputs: dict[str, Artifact], store: ArtifactStore,
           device: torch.device | None = None) -> StageContext:
        specs = output_specs(stage, config, {kind: a.version for kind, a in inputs.items()})
        return cls(stage.NAME, stage.CODE_VERSION, config, inputs, store, specs, device or default_device())

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"muse.stages.{self.stage.replace('-', '_')}")

    @property
    def input_versions(self) -> dict[str, str]:
        return {kind: a.version for kind, a in self.inputs.items()}

    def version(self, kind: str) -> str:
        return self.outputs[kind].version(self.stage, self.code_version)

    def existing(self, kind: str) -> Artifact | None:
        """`kind` already committed at this run's version (a stage with several outputs skips those), else None."""
        version = self.version(kind)
        return self.store.get(kind, version) if self.store.has(kind, version) else None

    def warm_start_artifact(self, key: str, ref: str, kind: str) -> Artifact:
        """The trained `kind` artifact config key `key` names as `ref` (KIND:VERSION) to begin training from; a
        one-line ConfigError naming the key when it is another kind or not in the store."""
        from muse.artifacts.store import MissingArtifact
        from muse.config import ConfigError

        init_kind, _, version = ref.partition(":")
        if init_kind != kind:
            raise ConfigError(f"{key} {ref!r}: this trains a {kind} model; start it from a {kind}:VERSION artifact")
        try:
            artifact = self.store.get(kind, version)
        except MissingArtifact:
            raise ConfigError(f"{key} {ref!r}: no such artifact in the store {self.store.location} "
                              f"(`muse artifacts ls {kind}` lists them)") from None
        self.log.info("%s: warm start from %s", kind, artifact.manifest.label)
        return artifact

    def work_dir(self, kind: str) -> Path:
        """Checkpoints and scratch of `kind` at this version: survive a crash, go with the commit.

        A training run with no checkpoint of its own continues from the last checkpoint of a committed run that
        differs from it only in `train.steps` and had no more steps, when every schedule it reads is `constant`:
        the data position, RNGs and optimizer state carry over, so the result is the one training from step 0
        would give. A cosine schedule decays over the whole run, so a longer run has higher rates from the start
        than the shorter one had: it trains from step 0 instead, as the version it is committed under promises."""
        from muse.training import CHECKPOINT  # training pulls in the models; data stages need not

        path = self.store.work_dir(kind, self.version(kind))
        saved = self._continue_dir(kind)
        if (path / CHECKPOINT).is_file() or not (saved / CHECKPOINT).is_file():
            return path
        shorter = json.loads((saved / "run.json").read_text())
        trains = _train_sections(self.outputs[kind].config)
        steps = max(t["steps"] for t in trains)
        if shorter["steps"] > steps:
            return path
        if any(t["schedule"] != "constant" for t in trains):
            self.log.info("%s: a %d-step run of this config exists (%s:%s), but its cosine schedule differs from a "
                          "%d-step one's from step 0: training from step 0", kind, shorter["steps"], kind,
                          shorter["version"], steps)
            return path
        shutil.copy(saved / CHECKPOINT, path / CHECKPOINT)
        if shorter["version"] != self.version(kind):
            self.continued[kind] = f"{kind}:{shorter['version']} at step {shorter['steps']}"
            self.log.info("%s: continuing %s to step %d", kind, self.continued[kind], steps)
        return path

    def _continue_dir(self, kind: str) -> Path:
        spec = self.outputs[kind]
        family = content_version(self.stage, _without_steps(spec.config), spec.inputs, self.code_version)
        return self.store.root / ".work" / kind / CONTINUE_DIR / family

    def _keep_last_checkpoint(self, kind: str, work_dir: Path, steps: int) -> None:
        """Move the finished run's checkpoint where a longer run of the same config finds it."""
        from muse.training import CHECKPOINT

        if not (work_dir / CHECKPOINT).is_file():
            return
        saved = self._continue_dir(kind)
        saved.mkdir(parents=True, exist_ok=True)
        os.replace(work_dir / CHECKPOINT, saved / CHECKPOINT)
        (saved / "run.json").write_text(json.dumps({"version": self.version(kind), "steps": steps}))

    @contextlib.contextmanager
    def commit(self, kind: str, figures: dict[str, float] | None = None, grids: int = 0) -> Iterator[ArtifactWriter]:
        """Write output `kind`: yields the store's writer. With `figures` (a TrainLoop's last figures), the run's
        TensorBoard events and last `grids` sample grids go into the artifact and the figures into its metrics as
        `train_*`, after what the stage put there."""
        from muse.training import (
            record_training,  # training pulls in the models; data stages need not
        )

        with self.store.create(kind, **self.outputs[kind].create_kwargs(self.stage, self.code_version)) as out:
            yield out
            if kind in self.continued:
                out.details = {**out.details, "continued_from": self.continued[kind]}
            if figures is not None:
                work_dir = self.store.work_dir(kind, self.version(kind))
                out.metrics.update(record_training(work_dir, out.path, figures, grids))
                self._keep_last_checkpoint(kind, work_dir, int(out.metrics["steps"]))
        if out.artifact.version != self.version(kind):  # the runner's reuse check must find what was written
            raise RuntimeError(f"stage {self.stage} committed {out.artifact.ref}, expected version {self.version(kind)}")


def execute(stage: ModuleType, config, inputs: dict[str, Artifact], store: ArtifactStore):
    """Run `stage` outside the flow (tests, notebooks): build its context and call its `run`."""
    return stage.run(StageContext.of(stage, config, inputs, store))
