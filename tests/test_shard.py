"""The shard stage on every source kind, with planted bad files, read back with plain webdataset."""

import csv
import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from muse.datasets.demo import panoptic_ids, write_folder
from muse.datasets.shards import read_samples, shard_files
from muse.datasets.sources import SourceError
from muse.stage import execute
from muse.stages import shard


def _img(color, size=(40, 40), mode="RGB"):
    return Image.new(mode, size, color)


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _read_all(artifact):
    out = {}
    for split in ("train", "val"):
        urls = [str(p) for p in shard_files(artifact.path, split)]
        if urls:
            for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
                meta = s["json"]
                assert meta["split"] == split and meta["key"] == s["__key__"]
                out[meta["source"]] = (s["txt"], s.get("png", s.get("jpg")), meta)
    return out


def _bad_folder(root):
    """Good images plus one of each kind of bad input; returns {file: expected reject reason or None}."""
    root.mkdir()
    files = {}

    def put(name, data, caption="a caption", expect=None):
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name.split(".")[0]).with_suffix(".txt").write_text(caption)
        files[name] = expect

    put("red.png", _png_bytes(_img((255, 0, 0))), "  a red\n square  ")
    put("blue.jpg", _jpg_bytes(_img((0, 0, 255), (60, 40)), quality=95), "a blue thing")
    put("cmyk.jpg", _jpg_bytes(_img((0, 255, 255, 0), mode="CMYK")), "cmyk image")
    put("alpha.png", _png_bytes(_img((0, 255, 0, 0), mode="RGBA")), "transparent")
    put("corrupt.jpg", b"this is not an image at all", expect="corrupt")
    put("empty.png", b"", expect="empty")
    full = _jpg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    put("trunc.jpg", full[: len(full) // 2], expect="truncated")
    put("tiny.png", _png_bytes(_img((1, 2, 3), (1, 1))), expect="too_small")
    put("nocap.png", _png_bytes(_img((9, 9, 9))), caption=None, expect="no_caption")
    put("blankcap.png", _png_bytes(_img((8, 8, 8))), caption="   \n", expect="no_caption")
    put("zdup.png", _png_bytes(_img((255, 0, 0))), "same bytes as red", expect="duplicate")
    (root / "notes.txt").write_text("caption without image: not a sample")
    return files


def test_folder_source_with_bad_files(tmp_path, store, small_config):
    files = _bad_folder(tmp_path / "src")
    cfg = small_config(f"shard.source={tmp_path / 'src'}", "shard.val_fraction=0.0")
    art = execute(shard, cfg, {}, store)
    m = art.manifest.metrics
    expected = {r: sum(1 for e in files.values() if e == r) for r in shard.REJECT_REASONS}
    assert {r: m[f"rejected_{r}"] for r in shard.REJECT_REASONS} == expected
    assert m["read"] == len(files) and m["written"] == 4 and m["written_val"] == 0
    examples = art.manifest.details["rejected_examples"]
    assert any("corrupt.jpg" in e for e in examples["corrupt"])

    got = _read_all(art)
    assert set(got) == {"red.png", "blue.jpg", "cmyk.jpg", "alpha.png"}
    caption, img, meta = got["red.png"]
    assert caption == "a red square"  # whitespace normalised
    assert img.size == (32, 32) and img.mode == "RGB"
    assert np.abs(np.asarray(img).astype(int) - [255, 0, 0]).max() <= 2  # PNG: exact pixels survive
    assert meta["original_width"] == 40 and meta["sha256"] == hashlib.sha256((tmp_path / "src/red.png").read_bytes()).hexdigest()
    assert np.asarray(got["alpha.png"][1]).min() >= 250  # transparent -> white, not black
    assert got["cmyk.jpg"][1].mode == "RGB"
    blue = np.asarray(got["blue.jpg"][1]).astype(int)
    assert blue[..., 2].mean() > 200 and blue[..., 0].mean() < 40


def test_too_large_is_rejected(tmp_path, store, small_config):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.png").write_bytes(_png_bytes(_img((5, 5, 5), (200, 200))))
    (src / "big.txt").write_text("big")
    (src / "ok.png").write_bytes(_png_bytes(_img((5, 6, 5), (40, 40))))
    (src / "ok.txt").write_text("ok")
    art = execute(shard, small_config(f"shard.source={src}", "shard.max_pixels=10000"), {}, store)
    assert art.manifest.metrics["rejected_too_large"] == 1 and art.manifest.metrics["written"] == 1


def test_zero_valid_samples_is_an_error_that_says_why(tmp_path, store, small_config):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"junk")
    (src / "a.txt").write_text("cap")
    with pytest.raises(SourceError, match="yielded no valid samples: read 1; rejected: corrupt 1"):
        execute(shard, small_config(f"shard.source={src}"), {}, store)
    assert store.list("shards") == []
    with pytest.raises(SourceError, match="no such file or folder"):
        shard.config_of(small_config(f"shard.source={tmp_path / 'missing'}"))


def test_demo_folder_round_trip_keeps_panoptic_masks(tmp_path, store, small_config):
    src = write_folder(tmp_path / "demo", num_samples=6, image_size=48, seed=3)
    art = execute(shard, small_config(f"shard.source={src}", "shard.val_fraction=0"), {}, store)
    samples = list(read_samples(art.path, "train"))
    assert len(samples) == 6
    for s in samples:
        stem = s["info"]["source"].split(".")[0]
        assert s["caption"] == (src / f"{stem}.txt").read_text().strip()
        ids = panoptic_ids(s["panoptic"])
        assert s["panoptic"].size == s["image"].size == (32, 32)
        segs = {x["id"] for x in s["info"]["source_info"]["segments_info"]}
        assert set(np.unique(ids)) <= {0, *segs} and len(np.unique(ids)) > 1


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_metadata_sources(tmp_path, store, small_config, fmt):
    src = tmp_path / "meta"
    (src / "imgs").mkdir(parents=True)
    rows = []
    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        (src / "imgs" / f"{i}.png").write_bytes(_png_bytes(_img(color)))
        rows.append({"file_name": f"imgs/{i}.png", "text": f"colour {i}"})
    rows.append({"file_name": "imgs/missing.png", "text": "gone"})
    path = src / f"metadata.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file_name", "text"])
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    art = execute(shard, small_config(f"shard.source={path if fmt == 'csv' else src}", "shard.val_fraction=0"), {}, store)
    assert art.manifest.details["source_kind"] == "metadata"
    assert art.manifest.metrics["rejected_missing_image"] == 1
    got = _read_all(art)
    assert {k: v[0] for k, v in got.items()} == {f"imgs/{i}.png": f"colour {i}" for i in range(3)}


def test_metadata_with_wrong_column_names_the_file_and_column(tmp_path, store, small_config):
    path = tmp_path / "metadata.jsonl"
    path.write_text(json.dumps({"picture": "a.png", "text": "x"}) + "\n")
    with pytest.raises(SourceError, match=r"metadata.jsonl:1: no image column: none of file_name, image.*"
                                          r"\(has: picture, text\); set shard.image_column"):
        execute(shard, small_config(f"shard.source={path}"), {}, store)
    with pytest.raises(SourceError, match=r"metadata.jsonl:1: no column 'file_name'"):
        execute(shard, small_config(f"shard.source={path}", "shard.image_column=file_name"), {}, store)
    cfg = small_config(f"shard.source={path}", "shard.image_column=picture")
    (tmp_path / "a.png").write_bytes(_png_bytes(_img((1, 100, 1))))
    assert execute(shard, cfg, {}, store).manifest.metrics["written"] == 1


def test_webdataset_source_img2dataset_layout_and_brace_pattern(tmp_path, store, small_config):
    src = tmp_path / "tars"
    src.mkdir()
    n = 0
    for t in range(2):
        with wds.TarWriter(str(src / f"{t:05d}.tar")) as w:
            for j in range(3):
                key = f"{t:05d}{j:04d}"
                ext = "webp" if j == 2 else "jpg"
                buf = io.BytesIO()
                _img((50 * j, 80 * t, 160), (48, 40)).save(buf, format="WEBP" if ext == "webp" else "JPEG")
                w.write({"__key__": key, ext: buf.getvalue(), "txt": f"sample {key}",
                         "json": json.dumps({"url": f"http://x/{key}", "status": "success"})})
                n += 1
    # A truncated third tar: the sample it breaks off in is counted, not fatal.
    good = (src / "00000.tar").read_bytes()
    (src / "00002.tar").write_bytes(good[: len(good) // 2 + 100])
    cfg = small_config(f"shard.source={src}/{{00000..00002}}.tar", "shard.val_fraction=0", "shard.dedupe=false")
    art = execute(shard, cfg, {}, store)
    got = _read_all(art)
    good = {f"{t:05d}.tar:{t:05d}{j:04d}" for t in range(2) for j in range(3)}
    assert good <= set(got) and len(good) == n
    assert all(k.startswith("00002.tar:") for k in set(got) - good)  # complete samples before the break are kept
    assert art.manifest.metrics["rejected_truncated"] == 1
    for caption, img, meta in got.values():
        assert caption.startswith("sample ") and img.size == (32, 32)
        assert meta["source_info"]["status"] == "success"


def test_demo_source_output_is_identical_for_1_and_2_workers(tmp_path, small_config):
    from muse.artifacts.store import ArtifactStore

    digests = []
    for workers in (1, 2):
        st = ArtifactStore(tmp_path / f"store{workers}")
        art = execute(shard, small_config(f"shard.workers={workers}"), {}, st)
        digests.append({f.path: f.sha256 for f in art.manifest.files})
        assert art.manifest.metrics["written"] == 24
    assert digests[0] == digests[1]
    assert shard.config_of(small_config("shard.workers=1")) == shard.config_of(small_config("shard.workers=2"))


def test_dedupe_can_be_turned_off(tmp_path, store, small_config):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        (src / f"{name}.png").write_bytes(_png_bytes(_img((7, 70, 140))))
        (src / f"{name}.txt").write_text(name)
    assert execute(shard, small_config(f"shard.source={src}"), {}, store).manifest.metrics["rejected_duplicate"] == 1
    assert execute(shard, small_config(f"shard.source={src}", "shard.dedupe=false"), {}, store).manifest.metrics["written"] == 2


def test_split_is_stable_and_near_the_fraction():
    ids = [f"img/{i}.jpg" for i in range(4000)]
    splits = [shard.split_of(s, 0.1) for s in ids]
    assert splits == [shard.split_of(s, 0.1) for s in ids]
    assert 0.08 < splits.count("val") / len(ids) < 0.12
    # Adding data never moves an existing sample across splits.
    assert [shard.split_of(s, 0.1) for s in ids[:100]] == splits[:100]
    assert all(shard.split_of(s, 0.0) == "train" for s in ids[:50])


def test_source_change_changes_the_version(tmp_path, small_config):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_png_bytes(_img((1, 1, 1))))
    (src / "a.txt").write_text("a")
    before = shard.config_of(small_config(f"shard.source={src}"))
    (src / "b.png").write_bytes(_png_bytes(_img((2, 2, 2))))
    assert shard.config_of(small_config(f"shard.source={src}")) != before


def test_exif_orientation_is_applied(tmp_path, store, small_config):
    src = tmp_path / "src"
    src.mkdir()
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red
    arr[:, 40:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(src / "rot.jpg", exif=exif, quality=95)
    (src / "rot.txt").write_text("rotated")
    art = execute(shard, small_config(f"shard.source={src}", "shard.val_fraction=0"), {}, store)
    _, out, meta = _read_all(art)["rot.jpg"]
    pixels = np.asarray(out).astype(int)
    # Displayed upright, the red half is on top and the blue half at the bottom.
    assert pixels[2, 16, 0] > 200 and pixels[2, 16, 2] < 60
    assert pixels[-3, 16, 2] > 200 and pixels[-3, 16, 0] < 60
    assert (meta["original_width"], meta["original_height"]) == (80, 40)


@pytest.mark.usefixtures("ray_local")
def test_ray_data_writes_the_same_shards_and_counters_as_the_process_pool(tmp_path, small_config):
    from muse.artifacts.store import ArtifactStore

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:02d}.png").write_bytes(_png_bytes(_img((6 * i, 70, 140))))
        (src / f"{i:02d}.txt").write_text(f"caption {i}")
    (src / "dup.png").write_bytes((src / "03.png").read_bytes())
    (src / "dup.txt").write_text("a duplicate")
    (src / "bad.png").write_bytes(b"not a png")
    (src / "bad.txt").write_text("corrupt")
    runs = {}
    for engine in ("processes", "ray"):
        cfg = small_config(f"shard.source={src}", f"shard.engine={engine}", "shard.workers=2")
        art = execute(shard, cfg, {}, ArtifactStore(tmp_path / engine))
        runs[engine] = ({f.path: f.sha256 for f in art.manifest.files if f.path.endswith(".tar")},
                        art.manifest.metrics)
    (tars, metrics), (ray_tars, ray_metrics) = runs["processes"], runs["ray"]
    assert tars == ray_tars and tars
    assert metrics["written"] == ray_metrics["written"] == 40
    assert metrics["rejected_duplicate"] == ray_metrics["rejected_duplicate"] == 1
    assert metrics["rejected_corrupt"] == ray_metrics["rejected_corrupt"] == 1
    assert shard.config_of(cfg) == shard.config_of(small_config(f"shard.source={src}"))  # one version
