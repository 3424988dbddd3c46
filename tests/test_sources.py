"""The data users bring, through the shard stage: producers' layouts, their keys, URLs, and reads kept in the source."""

import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from muse.datasets.shards import read_samples
from muse.datasets.sources import SourceError, detect_kind
from muse.stage import execute
from muse.stages import shard


def _jpg(color, size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _samples(art) -> dict[str, dict]:
    return {s["key"]: s for split in ("train", "val") for s in read_samples(art.path, split)}


def test_img2dataset_parquet_output_keeps_its_keys_for_a_join_back(tmp_path, store, small_config):
    """img2dataset `--output_format parquet`: shards of rows with the image bytes in `jpg`; failed rows have none."""
    src = tmp_path / "i2d"
    src.mkdir()
    for shard_no in range(2):
        rows = [{"key": f"{shard_no:05d}{i:04d}", "caption": f"photo {shard_no}-{i}", "url": f"http://x/{i}.jpg",
                 "status": "success", "error_message": None, "width": 40, "height": 40,
                 "jpg": _jpg((30 * i, 90 * shard_no, 200))} for i in range(3)]
        rows.append({"key": f"{shard_no:05d}0003", "caption": "lost", "url": "http://x/lost.jpg", "status":
                     "failed_to_download", "error_message": "timeout", "width": None, "height": None, "jpg": None})
        pq.write_table(pa.Table.from_pylist(rows), src / f"{shard_no:05d}.parquet")
        (src / f"{shard_no:05d}_stats.json").write_text("{}")
    assert detect_kind(str(src)) == "metadata"
    art = execute(shard, small_config(f"shard.source={src}", "shard.val_fraction=0.3"), {}, store)
    got = _samples(art)
    producer = pa.concat_tables([pq.read_table(p) for p in sorted(src.glob("*.parquet"))]).to_pylist()
    joined = {r["key"]: r for r in producer if r["key"] in got}
    assert len(joined) == 6 == len(got)  # every written sample joins back on its own key
    for key, s in got.items():
        assert s["caption"] == joined[key]["caption"] and s["info"]["source_info"]["url"] == joined[key]["url"]
    assert art.manifest.metrics["rejected_missing_image"] == 2
    assert "failed_to_download: timeout" in art.manifest.details["rejected_examples"]["missing_image"][0]


def test_hugging_face_parquet_with_image_structs(tmp_path, store, small_config):
    rows = [{"image": {"bytes": _jpg((200, 10 * i, 10)), "path": f"img{i}.jpg"}, "text": f"red {i}"} for i in range(4)]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    art = execute(shard, small_config(f"shard.source={path}", "shard.val_fraction=0"), {}, store)
    got = _samples(art)
    assert sorted(s["caption"] for s in got.values()) == [f"red {i}" for i in range(4)]
    assert sorted(got) == [f"{i:09d}" for i in range(4)]  # no producer key: the read index


def test_image_folder_with_split_folders_reads_every_split(tmp_path, store, small_config):
    """Hugging Face ImageFolder: `train/metadata.jsonl` and `test/metadata.jsonl` under the folder given."""
    root = tmp_path / "imagefolder"
    for split, n in (("train", 3), ("test", 2)):
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            (root / split / f"{i}.jpg").write_bytes(_jpg((10, 50 * i, 100 if split == "train" else 200)))
            lines.append(json.dumps({"file_name": f"{i}.jpg", "text": f"{split} {i}"}))
        (root / split / "metadata.jsonl").write_text("\n".join(lines))
    assert detect_kind(str(root)) == "metadata"
    art = execute(shard, small_config(f"shard.source={root}", "shard.val_fraction=0"), {}, store)
    got = _samples(art)
    assert {k: s["caption"] for k, s in got.items()} == {
        **{f"train_{i}": f"train {i}" for i in range(3)}, **{f"test_{i}": f"test {i}" for i in range(2)}}


def _tar(path, keys, gz=False):
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for i, key in enumerate(keys):
            w.write({"__key__": key, "jpg": _jpg((20 * i, 100, 50)), "txt": f"caption {key}",
                     "json": json.dumps({"key": key, "status": "success"})})
    data = gzip.compress(buf.getvalue()) if gz else buf.getvalue()
    path.write_bytes(data)
    return data


def test_gzipped_tars_and_fsspec_urls(tmp_path, store, small_config):
    import fsspec

    _tar(tmp_path / "00000.tar.gz", ["000000010", "000000011"], gz=True)
    art = execute(shard, small_config(f"shard.source={tmp_path / '00000.tar.gz'}", "shard.val_fraction=0"), {}, store)
    assert sorted(_samples(art)) == ["000000010", "000000011"]

    fs = fsspec.filesystem("memory")
    for n in range(2):
        fs.pipe(f"/bucket/data/{n:05d}.tar", _tar(tmp_path / f"m{n}.tar", [f"{n:05d}0000", f"{n:05d}0001"]))
    for source in ("memory://bucket/data/{00000..00001}.tar", "memory://bucket/data/"):
        cfg = small_config(f"shard.source={source}", "shard.val_fraction=0", "shard.dedupe=false")
        assert shard.source_kind(cfg) == "webdataset"
        art = execute(shard, cfg, {}, store)
        assert sorted(_samples(art)) == ["000000000", "000000001", "000010000", "000010001"]
    before = shard.config_of(small_config("shard.source=memory://bucket/data/"))
    fs.pipe("/bucket/data/00001.tar", _tar(tmp_path / "changed.tar", ["000010000"]))
    assert shard.config_of(small_config("shard.source=memory://bucket/data/")) != before  # content moved: new version

    with pytest.raises(SourceError, match="'pipe:' sources run a shell command"):
        detect_kind("pipe:cat /etc/passwd")


def test_reads_stay_inside_the_source_folder(tmp_path, store, small_config):
    outside = tmp_path / "secret.txt"
    outside.write_text("root:x:0:0")
    (tmp_path / "outside.jpg").write_bytes(_jpg((1, 2, 3)))
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.jpg").write_bytes(_jpg((200, 0, 0)))
    (src / "ok.txt").write_text("a red photo")
    (src / "leak.jpg").write_bytes(_jpg((0, 200, 0)))
    os.symlink(outside, src / "leak.txt")  # a caption that is a link out of the folder
    art = execute(shard, small_config(f"shard.source={src}", "shard.val_fraction=0"), {}, store)
    assert [s["caption"] for s in _samples(art).values()] == ["a red photo"]
    assert art.manifest.metrics["rejected_outside_source"] == 1

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "in.jpg").write_bytes(_jpg((0, 0, 200)))
    rows = [{"file_name": "in.jpg", "text": "inside"}, {"file_name": "../outside.jpg", "text": "escape"},
            {"file_name": str(tmp_path / "outside.jpg"), "text": "absolute"}]
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    art = execute(shard, small_config(f"shard.source={meta}", "shard.val_fraction=0"), {}, store)
    assert [s["caption"] for s in _samples(art).values()] == ["inside"]
    assert art.manifest.metrics["rejected_outside_source"] == 2


def test_bad_metadata_rows_name_the_file_and_line(tmp_path, store, small_config):
    path = tmp_path / "metadata.jsonl"
    path.write_text(json.dumps({"file_name": "a.jpg", "text": "x"}) + "\n[1, 2]\n")
    (tmp_path / "a.jpg").write_bytes(_jpg((5, 5, 5)))
    with pytest.raises(SourceError, match=r"metadata.jsonl:2: a row must be an object with named columns, got list"):
        execute(shard, small_config(f"shard.source={path}"), {}, store)
    csv_path = tmp_path / "latin.csv"
    csv_path.write_bytes("file_name,text\na.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin.csv: not UTF-8"):
        execute(shard, small_config(f"shard.source={csv_path}"), {}, store)


def test_duplicate_producer_keys_are_counted_not_merged(tmp_path, store, small_config):
    src = tmp_path / "tars"
    src.mkdir()
    _tar(src / "a.tar", ["000000001", "000000002"])
    _tar(src / "b.tar", ["000000002", "000000003"])  # a second download reusing a key
    art = execute(shard, small_config(f"shard.source={src}", "shard.val_fraction=0", "shard.dedupe=false"), {}, store)
    assert sorted(_samples(art)) == ["000000001", "000000002", "000000003"]
    assert art.manifest.metrics["rejected_duplicate_key"] == 1


def test_odd_inputs_are_converted_or_counted(tmp_path, store, small_config):
    import numpy as np

    src = tmp_path / "odd"
    src.mkdir()
    grey = np.full((40, 40), 30000, np.uint16)  # a mid-grey 16-bit PNG
    Image.fromarray(grey).save(src / "deep.png")
    (src / "deep.txt").write_text("a grey square")
    (src / "my.photo.jpg").write_bytes(_jpg((0, 0, 200)))  # a dotted name keeps its whole stem
    (src / "my.photo.txt").write_text("a blue photo")
    (src / "long.jpg").write_bytes(_jpg((200, 0, 0)))
    (src / "long.txt").write_text("red " * 5000)
    (src / "latin.jpg").write_bytes(_jpg((0, 200, 0)))
    (src / "latin.txt").write_bytes("un caf\xe9 vert".encode("latin-1"))
    art = execute(shard, small_config(f"shard.source={src}", "shard.val_fraction=0", "shard.max_caption_chars=100"),
                    {}, store)
    got = _samples(art)
    assert sorted(got) == ["deep", "latin", "long", "my_photo"]
    assert abs(np.asarray(got["deep"]["image"]).mean() - 30000 / 65535 * 255) < 2  # not clipped to white
    assert len(got["long"]["caption"]) == 100 and got["my_photo"]["caption"] == "a blue photo"
    assert got["latin"]["caption"] == "un caf\ufffd vert"
    m = art.manifest.metrics
    assert m["captions_truncated"] == 1 and m["captions_not_utf8"] == 1 and m["written"] == 4


def test_samples_lost_in_a_truncated_tar_are_counted_when_the_producer_said_how_many(tmp_path, store, small_config):
    src = tmp_path / "tars"
    src.mkdir()
    data = _tar(src / "00000.tar", [f"{i:09d}" for i in range(6)])
    (src / "00000.tar").write_bytes(data[: len(data) // 3])  # the download broke off
    (src / "00000_stats.json").write_text(json.dumps({"successes": 6, "count": 6}))
    _tar(src / "00001.tar", ["000000100"])
    art = execute(shard, small_config(f"shard.source={src}", "shard.val_fraction=0", "shard.dedupe=false"), {}, store)
    m = art.manifest.metrics
    assert m["written"] + m["rejected_truncated"] == 7 and m["rejected_truncated"] >= 4


@pytest.mark.usefixtures("ray_local")
def test_ray_data_workers_read_the_tars_and_write_what_the_pool_writes(tmp_path, small_config):
    """Each tar is a Ray Data task that reads it on its worker: the same tar bytes and counters, a truncated tar
    and a key reused across tars included."""
    from muse.artifacts.store import ArtifactStore

    src = tmp_path / "tars"
    src.mkdir()
    for n in range(3):
        _tar(src / f"{n:05d}.tar", [f"{n:05d}{i:04d}" for i in range(5)])
    _tar(src / "00003.tar", ["000000001"])  # a key the first tar used
    data = _tar(src / "00004.tar", [f"4{i:08d}" for i in range(6)])
    (src / "00004.tar").write_bytes(data[: len(data) // 3])
    runs = {}
    for engine in ("processes", "ray"):
        art = execute(shard, small_config(f"shard.source={src}", f"shard.engine={engine}", "shard.dedupe=false"), {},
                      ArtifactStore(tmp_path / engine))
        runs[engine] = ({f.path: f.sha256 for f in art.manifest.files if f.path.endswith(".tar")},
                        {k: v for k, v in art.manifest.metrics.items() if k != "images_per_s"})
    assert runs["processes"] == runs["ray"] and runs["ray"][0]
    m = runs["ray"][1]
    assert m["written"] >= 15 and m["rejected_duplicate_key"] == 1 and m["rejected_truncated"] >= 1


def test_a_caption_that_is_not_text_is_rejected_not_stored_as_its_repr(tmp_path, store, small_config):
    (tmp_path / "a.jpg").write_bytes(_jpg((5, 5, 5)))
    (tmp_path / "b.jpg").write_bytes(_jpg((50, 5, 5)))
    rows = [{"file_name": "a.jpg", "text": ["a", "list"]}, {"file_name": "b.jpg", "text": "fine"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    art = execute(shard, small_config(f"shard.source={tmp_path / 'metadata.jsonl'}", "shard.val_fraction=0"), {}, store)
    assert [s["caption"] for s in _samples(art).values()] == ["fine"]
    assert art.manifest.metrics["rejected_no_caption"] == 1
