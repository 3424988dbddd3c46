"""Deployments of the `muse` flow: `muse/full-train` and one per stage, served with `prefect.serve`.

A deployment fixes the `target` parameter; a run may set the preset, force, pinned inputs,
and, within the served `DeploymentPolicy`, a source and overrides, e.g.
`prefect deployment run muse/finetune-decoder -p force='["finetune-decoder"]'`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .dag import TARGETS
from .pipeline import muse
from .policy import POLICY_ENV, DeploymentPolicy


def build_deployments(store: str | None = None, preset: str = "tiny") -> list:
    """One RunnerDeployment per target, named after it (`muse/<target>`)."""
    params = {"preset": preset} | ({"store": store} if store else {})
    return [
        muse.to_deployment(
            name=target,
            parameters={"target": target, **params},
            description=f"muse pipeline: {target}",
            tags=["muse"],
        )
        for target in TARGETS
    ]


def serve(store: str | None = None, preset: str = "tiny", sources: tuple[str, ...] = (),
          overrides: tuple[str, ...] = ()) -> None:
    """Register every deployment with the API server and execute their runs here (blocks), each run held to
    this store, these source folders and these override keys."""
    from prefect import serve as prefect_serve

    from muse.artifacts.remote import open_store

    location = open_store(store).location
    policy = DeploymentPolicy(location, tuple(str(Path(s).resolve()) for s in sources), tuple(overrides))
    os.environ[POLICY_ENV] = policy.to_env()  # inherited by the processes that execute the runs
    prefect_serve(*build_deployments(location, preset))
