"""A two-node Ray cluster on this machine (loopback only): segment, tokenize and a 2-worker train-vqgan on it.

`ray start --head` and a second `ray start --address` give two nodes of one CPU each; train-vqgan asks for two
workers of one CPU each, so Ray Train can place them only one per node. The stages run in a fresh driver
process, as `muse run` on a cluster's head would (Ray reads its authentication settings once per process).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import SMALL

pytestmark = pytest.mark.slow

DRIVER = """
import json, sys
import ray
from muse.artifacts.store import ArtifactStore
from muse.config import load_config
from muse.ray_runtime import init_ray
from muse.stage import execute
from muse.stages import segment, shard, tokenize, train_vqgan

cfg = load_config("tiny", overrides=json.loads(sys.argv[1]))
init_ray(cfg.ray)  # what the stages do: join the cluster
nodes = [n["Resources"].get("CPU") for n in ray.nodes() if n["Alive"]]
store = ArtifactStore(sys.argv[2])
arts = {"shards": execute(shard, cfg, {}, store)}
arts["segments"] = execute(segment, cfg, arts, store)
arts.update({a.kind: a for a in execute(train_vqgan, cfg, arts, store)})
arts["tokens"] = execute(tokenize, cfg, arts, store)
print("RESULT " + json.dumps({"nodes": nodes, **{k: a.manifest.metrics for k, a in arts.items()}}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_segment_tokenize_and_a_two_worker_vqgan_run_across_two_nodes(tmp_path):
    # Ray's token authentication: both nodes and the driver share one token for this cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray_cli = shutil.which("ray") or "ray"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]

    def ray(*args: str) -> None:
        subprocess.run([ray_cli, *args], check=True, env=env, timeout=120, capture_output=True)

    ray("start", "--head", f"--port={port}", "--include-dashboard=false", *common)
    try:
        ray("start", f"--address={address}", *common)
        overrides = [*SMALL, f"ray.address={address}", "train_vqgan.workers.num_workers=2",
                     "train_vqgan.workers.cpus_per_worker=1"]
        run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(overrides), str(tmp_path / "store")],
                             env=env, timeout=900, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        ray("stop", "--force")
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["nodes"] == [1.0, 1.0]
    for kind in ("vqgan-low", "vqgan-high", "vqseg"):
        assert result[kind]["workers"] == 2 and result[kind]["steps"] == 4, kind
    assert result["tokens"]["rows"] == 24
