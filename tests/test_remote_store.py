"""Stores at fsspec URLs: commit uploads files then the manifest; other machines read through their mirrors.

`memory://` is fsspec's in-process filesystem; two stores with different cache
dirs stand for two machines sharing one bucket.
"""

import uuid

import pytest

from muse.artifacts.remote import RemoteArtifactStore, is_remote, open_store
from muse.artifacts.store import ArtifactStore
from muse.cli import main
from muse.stage import execute
from muse.stages import shard
from tests.conftest import SMALL


@pytest.fixture
def url():
    return f"memory://muse-test-{uuid.uuid4().hex[:8]}"


def _write(store, payload=b"hello", config=None):
    with store.create("shards", stage="s", config=config or {"a": 1}, inputs={}, code_version="1") as w:
        (w.path / "sub").mkdir()
        (w.path / "sub" / "data.bin").write_bytes(payload)
        w.metrics["n"] = 1
    return w.artifact


def test_location_dispatch(tmp_path):
    assert is_remote("s3://bucket/x") and is_remote("memory://x") and not is_remote(tmp_path / "x")
    assert not is_remote("file:///tmp/x")
    assert isinstance(open_store(tmp_path / "local"), ArtifactStore)
    assert isinstance(open_store("memory://somewhere"), RemoteArtifactStore)


def test_commit_is_visible_from_another_machine(url, tmp_path):
    a = RemoteArtifactStore(url, tmp_path / "cache-a")
    art = _write(a)
    import fsspec

    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory:/")
    assert fs.exists(f"{root}/shards/{art.version}/_manifest.json")
    assert fs.cat_file(f"{root}/shards/latest").decode().strip() == art.version

    b = RemoteArtifactStore(url, tmp_path / "cache-b")
    assert [x.version for x in b.list("shards")] == [art.version]
    assert not (tmp_path / "cache-b" / "shards" / art.version / "sub" / "data.bin").exists()  # listing is cheap
    got = b.get("shards")
    assert (got.path / "sub" / "data.bin").read_bytes() == b"hello"
    assert got.path.is_relative_to(tmp_path / "cache-b")
    assert b.verify() == (1, [])
    second = _write(b, payload=b"v2", config={"a": 2})
    assert second.manifest.seq == 2 and a.get("shards").version == second.version  # a sees b's commit


def test_failed_commit_uploads_nothing(url, tmp_path):
    store = RemoteArtifactStore(url, tmp_path / "cache")
    first = _write(store)
    with pytest.raises(RuntimeError, match="boom"):
        with store.create("shards", stage="s", config={"a": 9}, inputs={}, code_version="1") as w:
            (w.path / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    other = RemoteArtifactStore(url, tmp_path / "other")
    assert [a.version for a in other.list("shards")] == [first.version]
    assert other.latest_version("shards") == first.version


def test_verify_and_pull_catch_a_flipped_remote_byte(url, tmp_path):
    import fsspec

    store = RemoteArtifactStore(url, tmp_path / "cache")
    art = _write(store, payload=b"0123456789")
    fs = fsspec.filesystem("memory")
    path = f"{url.removeprefix('memory:/')}/shards/{art.version}/sub/data.bin"
    fs.pipe_file(path, b"0123456780")
    assert [(p.path, p.reason) for p in store.verify()[1]] == [("sub/data.bin", "sha256 mismatch")]
    fresh = RemoteArtifactStore(url, tmp_path / "fresh")
    with pytest.raises(Exception, match="sha256 mismatch while pulling"):
        fresh.get("shards")


def test_stage_and_cli_on_a_remote_store(url, tmp_path, small_config, capsys, monkeypatch):
    monkeypatch.setenv("MUSE_CACHE", str(tmp_path / "cache"))
    store = open_store(url)
    art = execute(shard, small_config(), {}, store)
    assert main(["artifacts", "ls", "--store", url]) == 0
    assert art.version in capsys.readouterr().out
    assert main(["artifacts", "verify", "--store", url]) == 0
    assert "0 problems" in capsys.readouterr().out


def test_flow_skips_up_to_date_stage_on_a_remote_store(prefect_api, url, tmp_path, monkeypatch):
    from muse.flows.pipeline import muse

    monkeypatch.setenv("MUSE_CACHE", str(tmp_path / "cache"))
    first = muse(target="shard", overrides=SMALL, store=url)
    created = open_store(url).get("shards").manifest.created
    monkeypatch.setenv("MUSE_CACHE", str(tmp_path / "another-machine"))  # a second machine, empty mirror
    assert muse(target="shard", overrides=SMALL, store=url) == first
    again = open_store(url).get("shards").manifest
    assert again.seq == 1 and again.created == created  # reused, not rewritten


def test_a_crafted_manifest_cannot_write_outside_the_mirror(url, tmp_path):
    """A shared store's manifest names the files a reader pulls; `..` or absolute paths are refused before any write."""
    import json

    import fsspec

    from muse.artifacts.store import ArtifactError

    a = RemoteArtifactStore(url, tmp_path / "cache-a")
    art = _write(a)
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory:/")
    manifest = json.loads(fs.cat_file(f"{root}/shards/{art.version}/_manifest.json"))
    escape = "../../../../escaped.txt"
    import hashlib

    manifest["files"][0].update(path=escape, size=7, sha256=hashlib.sha256(b"planted").hexdigest())  # hash matches
    fs.pipe(f"{root}/shards/{art.version}/{escape}", b"planted")
    fs.pipe(f"{root}/shards/{art.version}/_manifest.json", json.dumps(manifest).encode())
    b = RemoteArtifactStore(url, tmp_path / "mirror" / "cache-b")
    with pytest.raises(ArtifactError, match=r"_manifest.json: invalid manifest field files.0.path: .*not a plain "
                                            r"relative path inside the artifact"):
        b.get("shards", art.version)
    assert not list(tmp_path.rglob("escaped.txt"))
