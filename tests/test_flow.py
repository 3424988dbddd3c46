"""The `muse` flow on a real (temporary) Prefect server, with the real shard stage."""

import json
import re

import pytest
from prefect.exceptions import FailedRun

from muse.artifacts.store import ArtifactStore
from muse.flows.dag import STAGES
from muse.flows.pipeline import muse
from tests.conftest import SMALL


def _run(store, target, overrides=SMALL, **kw):
    return muse(target=target, preset="tiny", overrides=overrides, store=str(store.root), **kw)


def test_stage_runs_then_is_up_to_date_then_forced(prefect_api, store, caplog):
    first = _run(store, "shard")
    # the stage's own INFO figures reach Prefect's handlers (the UI, the console), not only the flow's lines
    assert any(r.name == "muse.stages.shard" and "img/s" in r.getMessage() for r in caplog.records)
    art = store.get("shards")
    assert first == {"shards": art.version} and art.manifest.seq == 1
    created = art.manifest.created

    assert "shard done in" in caplog.text and f"wrote shards v1 ({art.version}); reused nothing" in caplog.text
    caplog.clear()
    assert _run(store, "shard") == first
    assert "up to date" in caplog.text and f"wrote nothing; reused shards v1 ({art.version})" in caplog.text
    again = store.get("shards")
    assert again.manifest.seq == 1 and again.manifest.created == created  # untouched

    caplog.clear()
    assert _run(store, "shard", force=["shard"]) == first
    assert store.get("shards").manifest.seq == 2
    assert f"forced: remaking shards v1 ({art.version})" in caplog.text

    changed = _run(store, "shard", overrides=[*SMALL, "demo.seed=9"])
    assert changed["shards"] != first["shards"] and len(store.list("shards")) == 2


def test_single_stage_with_missing_input_names_the_stage_to_run_first(prefect_api, tmp_path):
    empty = ArtifactStore(tmp_path / "empty")
    # A user's mistake ends the run Failed with its one line as the message (no traceback).
    with pytest.raises(FailedRun, match=r"^finetune-decoder: stage 'finetune-decoder' needs a 'shards' artifact.*"
                       r"run `muse run shard` first"):
        _run(empty, "finetune-decoder")
    with pytest.raises(FailedRun, match=r"needs shards:ffff.*run `muse run shard` first"):
        _run(empty, "segment", inputs={"shards": "ffff"})


def test_full_train_runs_every_stage_and_finetune_decoder_reruns_alone(prefect_api, ray_local, store, caplog):
    produced = _run(store, "full-train")
    assert "[1/9] shard finished" in caplog.text and "[9/9] evaluate finished" in caplog.text
    assert "ETA: after a first run of every stage" in caplog.text and "; ETA" not in caplog.text  # nothing timed yet
    timings = json.loads((store.root / ".work" / "stage-seconds.json").read_text())
    assert sorted(timings) == sorted(set(STAGES) - {"train-clip", "train-prior"}) and all(t >= 0 for t in timings.values())
    progress = _progress_artifacts()  # the UI's progress bars of the long work, each at 100% at the end
    for key in ("muse-train-vqgan-vqgan-low-progress", "muse-tokenize-files-progress", "muse-train-base-base-progress",
                "muse-finetune-decoder-decoder-progress"):
        assert progress[key][0] == 100.0, progress
    assert progress["muse-train-base-base-progress"][1] == "base: 4/4, ETA 0 s"
    kinds = ["base", "decoder", "guide", "report", "segments", "shards", "superres", "tokens", "vqgan-high",
             "vqgan-low", "vqseg"]
    assert store.kinds() == kinds and sorted(produced) == kinds
    assert store.get("segments").manifest.inputs == {"shards": store.get("shards").version}
    assert set(store.get("tokens").manifest.inputs) == {"shards", "segments", "vqgan-low", "vqgan-high", "vqseg"}
    report = store.get("report")
    assert report.manifest.inputs["decoder"] == store.get("decoder").version
    assert report.manifest.details["lineage"]["decoder"] == store.get("decoder").version  # the sampler used it
    assert report.manifest.inputs["guide"] == store.get("guide").version
    assert store.get("guide").manifest.inputs["base"] == store.get("base").version
    # Rerunning finetune-decoder alone (forced) reruns nothing upstream: every other artifact stays as it was.
    before = {k: (a.version, a.manifest.seq, a.manifest.created) for k in kinds for a in [store.get(k)]}
    _run(store, "finetune-decoder", force=["finetune-decoder"])
    after = {k: (a.version, a.manifest.seq, a.manifest.created) for k in kinds for a in [store.get(k)]}
    assert {k for k in kinds if before[k] != after[k]} == {"decoder"}
    assert after["decoder"][0] == before["decoder"][0] and after["decoder"][1] == 2  # same version, recommitted
    # With the guide off, full-train skips train-guide and evaluate no longer reads a guide: only the report changes.
    caplog.clear()
    _run(store, "full-train", overrides=[*SMALL, "train_guide.enabled=false"])
    assert "[8/8] evaluate finished" in caplog.text and "train-guide" not in caplog.text
    assert re.search(r"\[1/8\] shard finished, \d+ s into the run; ETA \d+ s", caplog.text)  # timed last run
    report = store.get("report")
    assert "guide" not in report.manifest.inputs and "guide" not in report.manifest.details["lineage"]
    assert report.version != after["report"][0] and store.get("guide").version == after["guide"][0]


def _progress_artifacts() -> dict[str, tuple[float, str]]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))

    return {a.key: (a.data, a.description) for a in asyncio.run(read())}


def test_unknown_target_and_force(prefect_api, store):
    with pytest.raises(FailedRun, match="unknown target 'nope'"):
        _run(store, "nope")
    with pytest.raises(FailedRun, match="--force 'shrad': unknown stage"):
        _run(store, "shard", force=["shrad"])


def test_prefect_ui_artifacts_are_published(prefect_api, store):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _run(store, "shard")

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["muse-shards", "muse-shards-config"]))
            )

    import asyncio

    arts = asyncio.run(read())
    kinds = {(a.key, a.type) for a in arts}
    assert ("muse-shards", "table") in kinds and ("muse-shards-config", "markdown") in kinds
    page = next(a for a in arts if a.type == "markdown").data
    assert "data:image/png;base64," in page and "## Config" in page
    # An up-to-date rerun leaves the keyed artifacts (the UI's latest) to the run that made the shards.
    _run(store, "shard")
    again = asyncio.run(read())
    assert sorted(a.id for a in again) == sorted(a.id for a in arts)


def test_a_tampered_input_is_refused_not_used(prefect_api, store):
    produced = _run(store, "shard")
    tar = sorted((store.root / "shards" / produced["shards"] / "train").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    with pytest.raises(FailedRun, match=r"^segment: .*train/000000.tar: sha256 mismatch"):
        _run(store, "segment")
    assert store.kinds() == ["shards"]


def test_an_up_to_date_rerun_only_reads_so_a_read_only_store_works(prefect_api, tmp_path):
    """A store mounted read-only (a shared volume, a published store): a rerun that reuses everything writes nothing."""
    import shutil
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root in a namespace that allows mounts)")
    try:
        store = ArtifactStore(mount / "store")
        first = _run(store, "shard")
        shutil.rmtree(store.root / ".locks")  # as a store written elsewhere would arrive
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        assert _run(store, "shard") == first
    finally:
        subprocess.run(["umount", str(mount)])


def test_the_run_eta_follows_the_dag_and_the_last_timings(tmp_path):
    from muse.flows.dag import upstream_stages
    from muse.flows.eta import eta_seconds, read_timings, record_timing

    names = ["shard", "segment", "train-vqgan", "tokenize", "train-base", "train-superres", "evaluate"]
    estimates = {"shard": 5, "segment": 10, "train-vqgan": 100, "tokenize": 20, "train-base": 60,
                 "train-superres": 90, "evaluate": 30}
    # shard ended at 5 and segment at 15: vqgan ends at 115, tokenize at 135, base and super-res side by side
    # (super-res, the longer, at 225), evaluate after both at 255.
    eta = eta_seconds(names, upstream_stages, {"shard": 5, "segment": 15}, estimates, started=0, now=15)
    assert eta == 255 - 15
    # evaluate started when the last upstream stage ended (90); one past its estimate ends now, not in the past
    assert eta_seconds(names, upstream_stages, {n: 90 for n in names[:-1]}, estimates, started=0, now=100) == 20
    assert eta_seconds(names, upstream_stages, {n: 10 for n in names[:-1]}, estimates, started=0, now=100) == 0
    assert eta_seconds(names, upstream_stages, {}, {k: v for k, v in estimates.items() if k != "evaluate"}, 0, 0) is None
    work = tmp_path / ".work"
    assert read_timings(work) == {}
    record_timing(work, "shard", 4.26)
    record_timing(work, "segment", 9.0)
    assert read_timings(work) == {"shard": 4.3, "segment": 9.0}
    (work / "stage-seconds.json").write_text("not json")
    assert read_timings(work) == {}  # a broken file costs the estimate, never the run


def test_finetune_decoder_waits_for_superres_only_when_it_learns_its_codes():
    from muse.config import load_config
    from muse.flows.dag import upstream_stages

    learns = load_config("tiny")
    assert learns.finetune_decoder.superres_rows > 0
    assert "train-superres" in upstream_stages("finetune-decoder", learns)
    alone = load_config("tiny", overrides=["finetune_decoder.superres_rows=0"])
    assert upstream_stages("finetune-decoder", alone) == ["shard", "train-vqgan"]  # beside base and super-res
    assert "train-superres" in upstream_stages("finetune-decoder")  # the DAG's edges: any input it may read
