"""End to end with a real Prefect server: `muse serve` + `prefect deployment run` (slow: ~1-2 min)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from muse.artifacts.store import ArtifactStore

from .conftest import SMALL

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _healthy(url):
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


def test_serve_and_deployment_run(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "COLUMNS": "250"}
    store = tmp_path / "store"
    procs = []
    try:
        server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(server)
        _wait(lambda: _healthy(api), 120, "the Prefect server")
        serve_log = open(tmp_path / "serve.log", "w")
        sections = sorted({item.split(".")[0] for item in SMALL})  # exactly the sections this test overrides
        allow = [a for section in sections for a in ("--allow-set", section)]
        procs.append(subprocess.Popen([sys.executable, "-m", "muse.cli", "serve", "--store", str(store), *allow],
                                      env=env, stdout=serve_log, stderr=subprocess.STDOUT, cwd=tmp_path))

        def cli(*args):
            return subprocess.run(["prefect", *args], env=env, capture_output=True, text=True)

        # `prefect.serve` registers deployments one by one: wait for each, then check the listing.
        names = ("muse/full-train", "muse/shard", "muse/train-guide", "muse/finetune-decoder", "muse/evaluate")
        for name in names:
            _wait(lambda: cli("deployment", "inspect", name).returncode == 0, 120, f"deployment {name}")
        ls = cli("deployment", "ls").stdout
        for name in names:
            assert name in ls, ls

        small = ('["demo.num_samples=16", "train_vqgan.low.resolution=32", "train_vqgan.high.resolution=32", '
                 '"train_vqgan.seg.resolution=32", "train_vqgan.train.steps=2", "train_vqgan.train.batch_size=2", '
                 '"train_vqgan.overrides={}"]')
        run = cli("deployment", "run", "muse/shard", "-p", f"overrides={small}", "--watch")
        assert run.returncode == 0, run.stdout + run.stderr
        assert ArtifactStore(store).get("shards").manifest.metrics["written"] == 16

        # full-train through the served deployment: every stage, ending with the report.
        run = cli("deployment", "run", "muse/full-train", "-p", f"overrides={json.dumps(SMALL)}", "--watch")
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "serve.log").read_text()[-3000:]
        assert ArtifactStore(store).get("report").manifest.metrics["prompts"] > 0
        runs = cli("flow-run", "ls").stdout
        assert "COMPLETED" in runs, runs
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
