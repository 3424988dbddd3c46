"""The `muse` flow: runs the DAG (or one stage of it) as Prefect tasks over the artifact store.

Each stage is a task that resolves its input artifacts, derives the version its
outputs would have, and either reuses them ("up to date") or calls the stage's
`run`. Tasks pass only `{kind: version}` references; data stays in the store.
Stages with no path between them under the config (train-base, train-superres, and
finetune-decoder unless it learns super-res's codes) are submitted together and run
concurrently, each holding its GPUs while it trains (`muse.placement`: never two on one
device unless the config allows it). Before any stage runs, each stage's `preflight(config)`
(where it has one) checks what can be known up front (extras, weights, scene maps) and says
what it will do. A user's mistake (`UserError`) ends
the task and the run in a Failed state whose message is that one line, not a traceback.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FailedRun
from prefect.states import Failed

from muse.artifacts.publish import ProgressArtifacts, publish, publish_reuse
from muse.artifacts.remote import open_store
from muse.artifacts.store import Artifact, ArtifactStore, MissingArtifact
from muse.config import ConfigError, PipelineConfig, load_config
from muse.errors import UserError
from muse.placement import placed
from muse.progress import reporting
from muse.stage import StageContext

from .dag import (
    FULL_TRAIN,
    PRODUCER,
    STAGES,
    TARGETS,
    inputs_of,
    preflight,
    stages_for,
    upstream_stages,
)
from .eta import TIMINGS_FILE, eta_seconds, read_timings, record_timing
from .policy import DeploymentPolicy


class MissingInput(UserError, RuntimeError):
    """A stage's input artifact is not in the store; the message names the stage to run first."""


def resolve_inputs(
    name: str, config: PipelineConfig, store: ArtifactStore, produced: dict[str, str], pinned: dict[str, str]
) -> dict[str, Artifact]:
    """Input artifacts of a stage: produced by this run, pinned by the caller, or `latest`."""
    inputs = {}
    for kind in inputs_of(name, config):
        version = produced.get(kind) or pinned.get(kind)
        try:
            inputs[kind] = store.check(store.get(kind, version))  # never use tampered or rotted data as good
        except MissingArtifact:
            what = f"{kind}:{version}" if version else f"a '{kind}' artifact"
            raise MissingInput(
                f"stage '{name}' needs {what}, which is not in the store {store.location}: "
                f"run `muse run {PRODUCER[kind]}` first (or `muse run {FULL_TRAIN}`)"
            ) from None
    return inputs


@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE)
def run_stage(
    name: str,
    config: PipelineConfig,
    store_root: str,
    upstream: list[dict[str, str]],
    pinned: dict[str, str],
    force: bool,
):
    """Run one stage unless its outputs already exist; returns {kind: version} of its outputs (or a Failed state
    with the one-line message of a user's mistake)."""
    try:
        return _run_stage(name, config, store_root, upstream, pinned, force)
    except UserError as e:
        return Failed(message=f"{name}: {e}")


def _run_stage(name: str, config: PipelineConfig, store_root: str, upstream: list[dict[str, str]],
               pinned: dict[str, str], force: bool) -> dict[str, str]:
    logger = get_run_logger()
    stage = STAGES[name]
    store = open_store(store_root)
    produced = {k: v for refs in upstream for k, v in refs.items()}
    ctx = StageContext.of(stage, config, resolve_inputs(name, config, store, produced, pinned), store)
    versions = {kind: ctx.version(kind) for kind in stage.OUTPUTS}
    with store.producing(name, "-".join(versions.values())):  # an identical run elsewhere finishes first; this one then reuses it
        return _produce(name, stage, ctx, versions, force, logger)


def _produce(name, stage, ctx: StageContext, versions: dict[str, str], force: bool, logger) -> dict[str, str]:
    store = ctx.store
    if not force and all(store.has(kind, versions[kind]) for kind in stage.OUTPUTS):
        outputs = [store.get(kind, versions[kind]) for kind in stage.OUTPUTS]
        for a in outputs:
            store.set_latest(a.kind, a.version)
            logger.info("%s: up to date, reusing %s", name, a.manifest.label)
            publish_reuse(a)
        return {a.kind: a.version for a in outputs}

    if force:
        for kind in stage.OUTPUTS:
            store.clear_work(kind, versions[kind])
            if store.has(kind, versions[kind]):  # training is seeded: the same config and inputs remake the same
                logger.info("%s: forced: remaking %s with its config and inputs, so expect the same contents "
                            "under the next vN", name, store.get(kind, versions[kind]).manifest.label)
    logger.info("%s: producing %s from %s", name, ", ".join(f"{k}:{v}" for k, v in versions.items()),
                ", ".join(f"{k}:{v}" for k, v in ctx.input_versions.items()) or "no inputs")
    clock = time.perf_counter()
    with placed(name, ctx.config) as device, reporting(ProgressArtifacts(name)):  # progress bars in the UI
        result = stage.run(ctx if device is None else replace(ctx, device=device))
    record_timing(store.root / ".work", name, time.perf_counter() - clock)  # the next run's ETA
    outputs = [result] if isinstance(result, Artifact) else list(result)
    kinds = sorted(a.kind for a in outputs)
    if kinds != sorted(stage.OUTPUTS):
        raise RuntimeError(f"stage {name} returned {kinds}, expected {sorted(stage.OUTPUTS)}")
    for a in outputs:
        if a.version != versions[a.kind]:  # the stage and the flow must agree, or reruns would never be up to date
            raise RuntimeError(f"stage {name} committed {a.ref}, but its version should be {versions[a.kind]}")
    for a in outputs:
        logger.info("%s: wrote %s (%d files) with metrics %s", name, a.manifest.label, len(a.manifest.files),
                    a.manifest.metrics)
        publish(a, store)
    return {a.kind: a.version for a in outputs}


@flow(name="muse", log_prints=True)
def muse(
    target: str = FULL_TRAIN,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    config_file: str | None = None,
    source: str | None = None,
    force: list[str] | None = None,
    store: str | None = None,
    inputs: dict[str, str] | None = None,
) -> dict[str, str]:
    """Run `target` (a stage name or full-train) over the artifact store; returns {kind: version}.

    overrides: `section.key=value` strings; source: the shard stage's data source;
    force: stages to rerun even when up to date; inputs: pinned versions {kind: version}
    for artifacts this run does not produce (default: latest).
    """
    logger = get_run_logger()
    try:
        policy = DeploymentPolicy.from_env()  # set by `muse serve`: what a deployment caller may choose
        if policy is not None:
            store = policy.check(store, config_file, list(overrides or []))
        force = list(force or [])
        for name in force:
            if name not in STAGES:
                raise ConfigError(f"--force {name!r}: unknown stage; choose from {', '.join(STAGES)}")
        config = load_config(preset, config_file, overrides or [])
        names = stages_for(target, config)
        if source is not None:
            config.shard.source = source
        if policy is not None:
            policy.check_source(config.shard.source)
        root = open_store(store).location
        logger.info("target %s: stages %s; store %s", target, ", ".join(names), root)
        for line in preflight(names, config):
            logger.info(line)
    except UserError as e:
        return Failed(message=str(e))

    started, clock = datetime.now(timezone.utc), time.perf_counter()
    estimates = read_timings(open_store(root).root / ".work")
    if len(names) > 1 and not all(name in estimates for name in names):
        logger.info("ETA: after a first run of every stage in this store (timings: .work/%s)", TIMINGS_FILE)
    futures = {}
    for name in names:
        upstream = [futures[u] for u in upstream_stages(name, config) if u in futures]
        futures[name] = run_stage.submit(name, config, root, upstream, dict(inputs or {}), name in force)
    # result() re-raises the first failing stage's own exception, in DAG order.
    produced: dict[str, str] = {}
    finished: dict[str, float] = {}
    for k, name in enumerate(names, 1):
        try:
            produced.update(futures[name].result())
        except FailedRun as e:  # a stage's Failed state: the user's mistake, in one line
            return Failed(message=str(e))
        finished[name] = now = time.perf_counter()
        if len(names) > 1:
            eta = eta_seconds(names, lambda n: upstream_stages(n, config), finished, estimates, clock, now)
            logger.info("[%d/%d] %s finished, %.0f s into the run%s", k, len(names), name, now - clock,
                        "" if eta is None or k == len(names) else f"; ETA {eta:.0f} s")
    logger.info(summary(target, open_store(root), produced, started, time.perf_counter() - clock))
    return produced


def summary(target: str, store: ArtifactStore, produced: dict[str, str], started: datetime, seconds: float) -> str:
    """One line at the end of a run: what it trained or wrote, what it reused, and where."""
    made, reused = [], []
    for kind, version in produced.items():
        m = next(a.manifest for a in store.list(kind) if a.version == version)  # manifests only: no file pulled
        (made if m.created >= started else reused).append(m.label)
    return (f"{target} done in {seconds:.0f} s; wrote {', '.join(made) or 'nothing'}; "
            f"reused {', '.join(reused) or 'nothing'}; store {store.location}")


__all__ = ["muse", "MissingInput", "TARGETS"]
