import json
import os

import pytest

from muse.artifacts.store import ArtifactStore, MissingArtifact


def _write(store, kind="shards", config=None, inputs=None, code="1", payload=b"hello"):
    with store.create(kind, stage="s", config=config or {"a": 1}, inputs=inputs or {}, code_version=code) as w:
        (w.path / "data.bin").write_bytes(payload)
        (w.path / "sub").mkdir()
        (w.path / "sub" / "x.txt").write_text("x")
        w.metrics["n"] = 2
    return w.artifact


def test_versions_are_content_derived():
    v = ArtifactStore.version_of
    base = v("s", {"a": 1, "b": [1, 2]}, {"shards": "abc"}, "1")
    assert base == v("s", {"b": [1, 2], "a": 1}, {"shards": "abc"}, "1")  # key order does not matter
    assert base != v("s", {"a": 2, "b": [1, 2]}, {"shards": "abc"}, "1")
    assert base != v("s", {"a": 1, "b": [1, 2]}, {"shards": "abd"}, "1")
    assert base != v("s", {"a": 1, "b": [1, 2]}, {"shards": "abc"}, "2")
    assert base != v("t", {"a": 1, "b": [1, 2]}, {"shards": "abc"}, "1")


def test_commit_writes_manifest_hashes_and_latest(store):
    a = _write(store)
    m = json.loads((a.path / "_manifest.json").read_text())
    assert m["kind"] == "shards" and m["seq"] == 1 and m["status"] == "complete"
    assert {f["path"] for f in m["files"]} == {"data.bin", "sub/x.txt"}
    assert store.latest_version("shards") == a.version
    assert store.get("shards").version == a.version
    assert store.resolve("shards:v1").version == a.version
    assert store.resolve(f"shards:{a.version[:6]}").version == a.version
    b = _write(store, config={"a": 2})
    assert b.manifest.seq == 2 and store.get("shards").version == b.version
    assert [x.version for x in store.list("shards")] == [a.version, b.version]
    assert not list((store.root / ".tmp").iterdir())


def test_failed_stage_leaves_no_artifact_and_latest_unchanged(store):
    a = _write(store)
    with pytest.raises(RuntimeError, match="boom"):
        with store.create("shards", stage="s", config={"a": 9}, inputs={}, code_version="1") as w:
            (w.path / "half.bin").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert [x.version for x in store.list("shards")] == [a.version]
    assert store.latest_version("shards") == a.version
    assert not list((store.root / ".tmp").iterdir())
    assert not store.has("shards", ArtifactStore.version_of("s", {"a": 9}, {}, "1"))


def test_rewrite_of_same_version_replaces_whole(store):
    a = _write(store, payload=b"one")
    b = _write(store, payload=b"two")
    assert a.version == b.version and b.manifest.seq == 2
    assert (b.path / "data.bin").read_bytes() == b"two"
    assert len(store.list("shards")) == 1


def test_verify_catches_a_flipped_byte(store):
    a = _write(store, payload=b"0123456789")
    checked, problems = store.verify()
    assert checked == 2 and problems == []
    data = bytearray((a.path / "data.bin").read_bytes())
    data[3] ^= 0x01
    (a.path / "data.bin").write_bytes(bytes(data))
    (a.path / "stray.txt").write_text("?")
    _, problems = store.verify()
    assert {(p.path, p.reason) for p in problems} == {("data.bin", "sha256 mismatch"), ("stray.txt", "file not in manifest")}


def test_verify_reads_on_past_a_bad_manifest_and_checks_latest(store):
    good = _write(store, payload=b"fine")
    other = _write(store, kind="tokens", payload=b"tok")
    (store.root / "tokens" / other.version / "_manifest.json").write_text("{not json")
    (store.root / "shards" / "latest").write_text("deadbeef0000\n")
    checked, problems = store.verify()
    reasons = {(p.ref, p.path): p.reason for p in problems}
    assert checked == len(good.manifest.files)  # the good artifact was still hashed
    assert "invalid manifest" in reasons[(f"tokens:{other.version}", "_manifest.json")]
    assert "points at 'deadbeef0000'" in reasons[("shards", "latest")]
    assert good.version in [a.version for a in store.list("shards")]


def test_tampered_files_are_refused_on_read(store):
    from muse.artifacts.store import ArtifactError

    a = _write(store, payload=b"0123456789")
    assert store.check(a) is a  # hashed once, then remembered while size and mtime hold
    data = bytearray((a.path / "data.bin").read_bytes())
    data[0] ^= 0x01
    (a.path / "data.bin").write_bytes(bytes(data))  # same size, new mtime
    with pytest.raises(ArtifactError, match=r"data.bin: sha256 mismatch"):
        store.check(store.get("shards"))
    (a.path / "data.bin").unlink()  # a deleted weights file: one line, before any worker loads it
    with pytest.raises(ArtifactError, match=r"data.bin: missing"):
        store.check(store.get("shards"))


def test_lineage_and_missing(store):
    shards = _write(store)
    tokens = _write(store, kind="tokens", inputs={"shards": shards.version})
    lines = store.lineage(tokens)
    assert lines[0].startswith("tokens v1") and lines[1].strip().startswith("shards v1")
    base = _write(store, kind="report", inputs={"tokens": tokens.version, "shards": shards.version})
    lines = store.lineage(base)  # a DAG: shards is an input twice over, printed in full once
    assert len(lines) == 4 and sum("shards v1" in line for line in lines) == 2
    assert lines[2].strip().startswith("tokens v1") and lines[3].strip().startswith("shards v1")
    with pytest.raises(MissingArtifact, match="no 'base' artifact"):
        store.get("base")
    with pytest.raises(MissingArtifact):
        store.resolve("shards:v7")


def test_work_dir_survives_until_cleared(store):
    w = store.work_dir("base", "abc123")
    (w / "ckpt.pt").write_bytes(b"x")
    assert store.work_dir("base", "abc123").joinpath("ckpt.pt").exists()
    store.clear_work("base", "abc123")
    assert not (store.root / ".work" / "base" / "abc123").exists()


def test_a_commit_clears_its_work_dir_and_orphans_of_dead_writers(store):
    import subprocess

    work = store.work_dir("shards", store.version_of("s", {"a": 1}, {}, "1"))
    (work / "checkpoint.pt").write_bytes(b"x" * 100)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that has exited
    from muse.artifacts import store as store_module

    orphan = store.root / ".tmp" / f"base-abc123-{store_module._HOST}-{dead.pid}-0123abcd"
    alive = store.root / ".tmp" / f"base-abc123-{store_module._HOST}-{os.getpid()}-0123abcd"
    elsewhere = store.root / ".tmp" / f"base-abc123-otherhost-{dead.pid}-0123abcd"
    for p in (orphan, alive, elsewhere):
        p.mkdir(parents=True)
    a = _write(store, config={"a": 1})
    assert not work.exists()  # its checkpoints went with the commit
    assert not orphan.exists() and alive.exists() and elsewhere.exists()
    stale = store.root / ".work" / "shards" / a.version
    stale.mkdir(parents=True)  # a kill between the commit and the clean-up
    assert store.gc() == [stale] and not stale.exists()


def test_two_identical_runs_produce_once(store):
    """The second waits for the first, then finds the artifact up to date instead of training it again."""
    import threading
    import time

    version = store.version_of("s", {"a": 1}, {}, "1")
    made = []

    def run():
        with store.producing("s", version):
            if store.has("shards", version):
                return
            time.sleep(0.3)
            made.append(_write(store, config={"a": 1}).version)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [version] and [a.manifest.seq for a in store.list("shards")] == [1]
