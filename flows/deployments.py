"""Deployments of the `muse` flow: `muse/full-train` and one per stage, served with `prefect.serve`.

A deployment only fixes the `target` parameter; everything else (preset,
overrides, source, force, store) can be set per run, e.g.
`prefect deployment run muse/finetune-decoder -p preset=tiny`.
"""

from __future__ import annotations

from .dag import TARGETS
from .pipeline import muse


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


def serve(store: str | None = None, preset: str = "tiny") -> None:
    """Register every deployment with the API server and execute their runs here (blocks)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(store, preset))
