"""Joining or starting Ray for the stages that fan out inside themselves (segment, tokenize)."""

from __future__ import annotations

import logging

from muse.config import RayConfig

log = logging.getLogger("muse.ray")


def init_ray(config: RayConfig) -> None:
    """Join `config.address` (a cluster) or start Ray locally; reuse an instance this process already has."""
    import ray
    from ray.data import DataContext

    data = DataContext.get_current()
    data.enable_progress_bars = data.enable_operator_progress_bars = config.data_progress
    logging.getLogger("ray.data").setLevel(logging.INFO if config.data_progress else logging.WARNING)
    if ray.is_initialized():
        return
    if config.address:
        ray.init(address=config.address)
        log.info("ray: joined cluster at %s: %s", config.address, ray.cluster_resources())
    else:
        ray.init(num_cpus=config.num_cpus, include_dashboard=False)
        log.info("ray: started locally: %s", ray.cluster_resources())


def gpus_per_actor(requested: float | None) -> float:
    """The configured GPUs per actor, or 1 when the cluster has GPUs and none was configured."""
    import ray

    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
