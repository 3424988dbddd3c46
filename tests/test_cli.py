"""The `muse` command line on a store written by the shard stage."""

import json
import os
import subprocess
import sys

import pytest

from muse.cli import main
from muse.stage import execute
from muse.stages import shard


@pytest.fixture
def written_store(store, small_config):
    execute(shard, small_config(), {}, store)
    return store


def test_artifacts_ls_show_verify(written_store, capsys):
    root = str(written_store.root)
    assert main(["artifacts", "ls", "--store", root]) == 0
    out = capsys.readouterr().out
    art = written_store.get("shards")
    assert "shards" in out and art.version in out and "v1*" in out

    assert main(["artifacts", "show", "shards:v1", "--store", root]) == 0
    out = capsys.readouterr().out
    assert "rejected_corrupt: 0" in out and "lineage:" not in out and "train/000000.tar" not in out  # a summary
    assert main(["artifacts", "show", "shards:v1", "--files", "--lineage", "--store", root]) == 0
    out = capsys.readouterr().out
    assert "lineage:" in out and "train/000000.tar" in out
    assert main(["artifacts", "show", "shards:v1", "--json", "--store", root]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == art.version

    assert main(["artifacts", "verify", "--store", root]) == 0
    assert "0 problems" in capsys.readouterr().out

    tar = art.path / "train" / "000000.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert main(["artifacts", "verify", "--store", root]) == 1
    out = capsys.readouterr().out
    assert f"BAD shards:{art.version}: train/000000.tar: sha256 mismatch" in out


def test_store_from_environment(written_store, capsys, monkeypatch):
    monkeypatch.setenv("MUSE_STORE", str(written_store.root))
    assert main(["artifacts", "ls", "shards"]) == 0
    assert written_store.get("shards").version in capsys.readouterr().out


def test_errors_are_one_line_and_nothing_runs(tmp_path, capsys):
    assert main(["run", "shard", "--set", "shard.bogus=1", "--store", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip() == "config error: preset tiny + --set: unknown key shard.bogus"
    assert main(["run", "nope", "--store", str(tmp_path / "s")]) == 2
    assert "unknown target 'nope'" in capsys.readouterr().err
    assert main(["artifacts", "show", "base", "--store", str(tmp_path / "s")]) == 1
    assert "no 'base' artifact" in capsys.readouterr().err
    # Missing extras and weights: one line naming the install command or the key, before anything runs.
    for overrides, expected in (
        (["segment.segmenters=[panoptic]", "segment.panoptic.backend=detectron2"], "pip install 'muse-pipeline[detectron2]'"),
        (["segment.segmenters=[masks, human]"], "segment.human.weights"),
        (["segment.segmenters=none", "train_superres.scene_conditioning=true"],
         "train_superres.scene_conditioning needs scene maps"),
    ):
        sets = [a for o in overrides for a in ("--set", o)]
        assert main(["run", "full-train", *sets, "--store", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_the_flows_raise_prefects_start_up_limit_and_keep_telemetry_off():
    """The embedded API of a first run gets more than Prefect's 20 s on a loaded host; no offline telemetry ERRORs."""
    script = ("import muse.flows; from prefect.settings import get_current_settings as s; "
              "print(s().server.ephemeral.startup_timeout_seconds, s().server.analytics_enabled)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    timeout, analytics = out.split()
    assert int(timeout) >= 120 and analytics == "False"


def test_config_show_and_help():
    out = subprocess.run([sys.executable, "-m", "muse.cli", "config", "show", "--set", "demo.seed=4"],
                         capture_output=True, text=True, check=True).stdout
    assert "seed: 4" in out and "train_vqgan:" in out
    for args in (["--help"], ["run", "--help"], ["artifacts", "verify", "--help"], ["serve", "--help"]):
        assert subprocess.run([sys.executable, "-m", "muse.cli", *args], capture_output=True).returncode == 0
