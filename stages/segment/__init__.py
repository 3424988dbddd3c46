"""Stage `segment`: Make-A-Scene scene maps for every sample of `shards`, through Ray Data.

Which segmenters run is decided first (`segmenters.plan`): the configured list, or under
`auto` the source's own masks, else the model segmenters that can run here, else none. With
none the artifact records "no scene maps" and why, and holds no tars.

Pipeline per split: read the shard tars (Ray Data's webdataset reader) -> one actor
pool per configured segmenter (models load once per actor; GPUs when the cluster
has them) -> merge into one label per pixel + an edge map -> the driver writes
sidecar tars with the same names and keys as the input shards (`KEY.seg.png`,
`KEY.edge.png`). A sample that fails to decode or segment gets no maps and is
recorded with its reason; the stage fails if more than `max_failed_fraction` do.
Rows are matched to their shard by path and key, so a retried task can neither
duplicate nor drop a key.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from muse.artifacts.store import PREVIEW_DIR, Artifact
from muse.config import ConfigError, PipelineConfig, SegmentConfig
from muse.datasets.labels import LabelSpace, build_label_space, palette
from muse.datasets.segments import SceneMaps, details
from muse.datasets.shards import SPLITS, read_samples, shard_files
from muse.datasets.tars import has_ending, tar_keys
from muse.progress import report
from muse.ray_runtime import gpus_per_actor, init_ray
from muse.stage import StageContext

from .merge import SegmentMaps, merge
from .segmenters import (
    ROLES,
    SceneInput,
    available_models,
    build_segmenter,
    check,
    plan,
)

NAME = "segment"
INPUTS: tuple[str, ...] = ("shards",)
OUTPUTS: tuple[str, ...] = ("segments",)
CODE_VERSION = "2"
MAX_LISTED_FAILURES = 50
PROGRESS_SECONDS = 10.0  # between progress lines while Ray segments a split

log = logging.getLogger("muse.stages.segment")


def config_of(config: PipelineConfig) -> dict:
    """Segmenters, label space and weights, and under `auto` the models that can run here (installing weights
    changes what auto does); not batch size, concurrency or GPUs (outputs do not depend on them)."""
    c = config.segment
    auto = available_models(c)[0] if c.segmenters == "auto" else None
    return c.model_dump(mode="json", exclude={"batch_size", "concurrency", "num_gpus"}) | {"auto_models": auto}


def _scene_conditioned(config: PipelineConfig) -> list[str]:
    return [k for k, on in (("train_base.scene_conditioning", config.train_base.scene_conditioning),
                            ("train_superres.scene_conditioning", config.train_superres.scene_conditioning)) if on]


def preflight(config: PipelineConfig) -> str:
    """Checked at the start of a run, before any stage: explicitly listed segmenters can be built here, and scene
    conditioning is not asked of a run without scene maps. Returns what segmenting will do, for the log."""
    c = config.segment
    check(c)
    wanted = _scene_conditioned(config)
    if c.segmenters == "none" and wanted:
        raise ConfigError(f"{wanted[0]} needs scene maps, but segment.segmenters is none")
    if c.segmenters == "none":
        return "segment: no scene maps (segment.segmenters is none)"
    if c.segmenters != "auto":
        return f"segment: {', '.join(c.segmenters)}"
    models, why_not = available_models(c)
    fallback = ", ".join(models) if models else f"no scene maps ({why_not})"
    return f"segment: auto: the source's masks where it ships them, else {fallback}"


# ----------------------------------------------------------------------------- encoding helpers


def _npy(arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arrays, allow_pickle=False)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def label_png(labels: np.ndarray, space: LabelSpace) -> bytes:
    """8-bit PNG while the label space fits, 16-bit beyond."""
    return _png(labels.astype(np.uint8) if space.size <= 256 else labels.astype(np.uint16))


def read_label_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)


def _decode(key: str, image: bytes, info: bytes, panoptic: bytes) -> SceneInput:
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    pan = np.asarray(Image.open(io.BytesIO(panoptic)).convert("RGB")) if panoptic else None
    return SceneInput(key, rgb, json.loads(info), pan)


# ----------------------------------------------------------------------------- Ray Data steps


def prepare(batch: dict) -> dict:
    """Shard columns -> the columns the segmenters share (image bytes whatever the extension)."""
    n = len(batch["__key__"])
    image = batch["jpg"] if "jpg" in batch else batch["png"]
    panoptic = batch["panoptic.png"] if "panoptic.png" in batch else [b""] * n
    return {
        "key": list(batch["__key__"]),
        "path": [str(Path(p).name) for p in batch["path"]],
        "image": list(image),
        "info": list(batch["json"]),
        "panoptic": [p if isinstance(p, bytes) else b"" for p in panoptic],
        "error": [""] * n,
    }


class SegmenterActor:
    """One segmenter model per actor; adds column `<name>` (npy of [labels, instances]) to each batch."""

    def __init__(self, name: str, config: SegmentConfig, device: str):
        self.name = name
        self.segmenter = build_segmenter(name, config, build_label_space(config.dataset_classes), device)

    def _run(self, inputs: list[SceneInput]) -> list[SegmentMaps]:
        maps = self.segmenter(inputs)
        if len(maps) != len(inputs):
            raise RuntimeError(f"segmenter {self.name} returned {len(maps)} maps for {len(inputs)} images")
        return maps

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        errors = list(batch["error"])
        inputs: dict[int, SceneInput] = {}
        for i in range(n):
            if errors[i]:
                continue
            try:
                inputs[i] = _decode(batch["key"][i], batch["image"][i], batch["info"][i], batch["panoptic"][i])
            except Exception as e:  # noqa: BLE001 - any undecodable sample is recorded, not fatal
                errors[i] = f"decode: {type(e).__name__}: {e}"
        results: dict[int, SegmentMaps] = {}
        try:
            results = dict(zip(inputs, self._run(list(inputs.values()))))
        except Exception:  # noqa: BLE001 - isolate the failing samples one by one
            for i, x in inputs.items():
                try:
                    results[i] = self._run([x])[0]
                except Exception as e:  # noqa: BLE001
                    errors[i] = f"{self.name}: {type(e).__name__}: {e}"
        batch = dict(batch)
        batch[self.name] = [
            _npy(np.stack([results[i].labels.astype(np.int32), results[i].instances.astype(np.int32)]))
            if i in results and not errors[i] else b""
            for i in range(n)
        ]
        batch["error"] = errors
        return batch


def finish(batch: dict, names: list[str], dataset_classes: list[str]) -> dict:
    """Merge the segmenters' maps into `seg` + `edge` PNGs and per-class pixel counts (a task, no actor:
    actors hold their CPU for the whole run, tasks give it back)."""
    space = build_label_space(dataset_classes)
    out = {"key": [], "path": [], "error": [], "seg": [], "edge": [], "class_pixels": []}
    for i, key in enumerate(batch["key"]):
        error = batch["error"][i]
        seg = edge = counts = b""
        if not error:
            by_role: dict[str, SegmentMaps] = {}
            for name in names:
                stacked = np.load(io.BytesIO(batch[name][i]))
                by_role[ROLES[name]] = SegmentMaps(stacked[0], stacked[1])
            labels, edges = merge(space, by_role.get("base"), by_role.get("human"), by_role.get("face"))
            seg, edge = label_png(labels, space), _png(edges)
            counts = np.bincount(labels.ravel(), minlength=space.size).astype(np.int64).tobytes()
        for col, value in zip(out, (key, batch["path"][i], error, seg, edge, counts)):
            out[col].append(value)
    return out


# ----------------------------------------------------------------------------- driver


def _segment_split(config: PipelineConfig, names: tuple[str, ...], paths: list[Path]):
    """Rows {key, path, error, seg, edge, class_pixels} for every sample of these shards, streamed."""
    import ray

    c = config.segment
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_webdataset([str(p) for p in paths], decoder=lambda sample: sample, include_paths=True)
    ds = ds.map_batches(prepare, batch_size=c.batch_size, batch_format="numpy")
    for name in names:
        # Reading masks is light: half a CPU, so a 2-core machine keeps a CPU for reading and merging.
        gpus, cpus = (0.0, 0.5) if name == "masks" else (gpus_per_actor(c.num_gpus), 1.0)
        ds = ds.map_batches(
            SegmenterActor,
            fn_constructor_kwargs={"name": name, "config": c, "device": "cuda" if gpus > 0 else "cpu"},
            batch_size=c.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=c.concurrency),
            num_gpus=gpus, num_cpus=cpus,
        )
    ds = ds.map_batches(finish, fn_kwargs={"names": list(names), "dataset_classes": list(c.dataset_classes)},
                        batch_size=c.batch_size, batch_format="numpy")
    return ds.iter_rows()


def _preview(shards: Artifact, maps: dict[str, tuple[bytes, bytes]], space: LabelSpace, path: Path) -> None:
    """Rows of image | label map over the image | edges for the given train samples."""
    colours = palette(space.size)
    tiles = []
    for s in read_samples(shards.path, "train"):
        if s["key"] in maps:
            seg, edge = maps[s["key"]]
            rgb = np.asarray(s["image"])
            overlay = (0.4 * rgb + 0.6 * colours[read_label_png(seg)]).astype(np.uint8)
            edges = np.repeat(np.asarray(Image.open(io.BytesIO(edge)))[..., None], 3, axis=2)
            tiles.append(np.concatenate([rgb, overlay, edges], axis=1))
            if len(tiles) == len(maps):
                break
    if tiles:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(tiles, axis=0)).save(path)


def _record_no_scene_maps(ctx: StageContext, p: SceneMaps, space: LabelSpace) -> Artifact:
    """The `segments` artifact of a run without scene maps: no tars, the reason in the manifest."""
    shards = ctx.inputs["shards"]
    samples = sum(len(tar_keys(path)) for split in SPLITS for path in shard_files(shards.path, split))
    with ctx.commit("segments") as out:
        out.metrics = {"samples": samples, "segmented": 0, "failed": 0, "scene_maps": 0}
        out.details = {**details(p), "label_space": space.to_json()}
    log.warning("segment: no scene maps, so the scene tokenizer and seg_tokens are skipped")
    return out.artifact


def run(ctx: StageContext) -> Artifact:
    """Segment every sample of the `shards` artifact into the `segments` artifact."""
    config = ctx.config
    c = config.segment
    shards = ctx.inputs["shards"]
    space = build_label_space(c.dataset_classes)
    check(c)
    tars = [path for split in SPLITS for path in shard_files(shards.path, split)]
    p = plan(c, any(has_ending(path, "panoptic.png") for path in tars))
    log.info("segment: %s: %s", p.plan, ", ".join(p.segmenters) or "no scene maps")
    if not p.present:
        wanted = _scene_conditioned(config)
        if wanted:
            raise ConfigError(f"{wanted[0]} needs scene maps, but this run has none ({p.plan})")
        return _record_no_scene_maps(ctx, p, space)
    init_ray(config.ray)
    start = time.perf_counter()
    class_pixels = np.zeros(space.size, np.int64)
    failures: list[dict] = []
    counts = defaultdict(int)
    with ctx.commit("segments") as out:
        preview: dict[str, tuple[bytes, bytes]] = {}
        for split in SPLITS:
            paths = shard_files(shards.path, split)
            if not paths:
                continue
            (out.path / split).mkdir()
            expected = {p.name: tar_keys(p) for p in paths}
            writers = {name: wds.TarWriter(str(out.path / split / name), mtime=0.0) for name in expected}
            written: dict[str, set[str]] = {name: set() for name in expected}
            failed: dict[str, set[str]] = {name: set() for name in expected}
            todo, done = sum(len(k) for k in expected.values()), 0
            logged, logged_done = time.perf_counter(), 0  # rates over the last interval: Ray's start-up is not a rate
            try:
                for row in _segment_split(config, p.segmenters, paths):
                    done += 1
                    if (now := time.perf_counter()) - logged >= PROGRESS_SECONDS:
                        rate = (done - logged_done) / (now - logged)
                        log.info("segment: %s %d/%d samples, %.1f img/s, ETA %.0fs", split, done, todo, rate,
                                 (todo - done) / rate)
                        report(split, done, todo, (todo - done) / rate)
                        logged, logged_done = now, done
                    shard, key = row["path"], row["key"]
                    if key in written[shard] or key in failed[shard]:
                        counts["duplicates_dropped"] += 1  # a retried task delivered it again
                        continue
                    if row["error"]:
                        failed[shard].add(key)
                        if len(failures) < MAX_LISTED_FAILURES:
                            failures.append({"key": key, "shard": f"{split}/{shard}", "reason": row["error"]})
                        log.warning("segment: %s/%s %s: %s", split, shard, key, row["error"])
                        continue
                    writers[shard].write({"__key__": key, "seg.png": row["seg"], "edge.png": row["edge"]})
                    written[shard].add(key)
                    class_pixels += np.frombuffer(row["class_pixels"], np.int64)
                    if split == "train" and len(preview) < 8:
                        preview[key] = (row["seg"], row["edge"])
            finally:
                for w in writers.values():
                    w.close()
            for name, keys in expected.items():
                missing = set(keys) - written[name] - failed[name]
                if missing:
                    raise RuntimeError(f"segment: {split}/{name}: {len(missing)} keys never came back, e.g. {sorted(missing)[:3]}")
                counts["samples"] += len(keys)
                counts["segmented"] += len(written[name])
                counts["failed"] += len(failed[name])

        fraction = counts["failed"] / max(counts["samples"], 1)
        if fraction > c.max_failed_fraction:
            raise RuntimeError(
                f"segment: {counts['failed']} of {counts['samples']} samples failed ({fraction:.1%} > "
                f"max_failed_fraction {c.max_failed_fraction:.1%}); first: "
                + "; ".join(f"{f['key']}: {f['reason']}" for f in failures[:3])
            )
        _preview(shards, preview, space, out.path / PREVIEW_DIR / "scenes.png")

        elapsed = time.perf_counter() - start
        total = int(class_pixels.sum())
        present = {space.names[i]: int(n) for i, n in enumerate(class_pixels) if n}
        (out.path / "class_pixels.json").write_text(json.dumps(present, indent=1))
        out.metrics = {
            "samples": counts["samples"], "segmented": counts["segmented"], "failed": counts["failed"],
            "failed_fraction": round(fraction, 4), "scene_maps": 1, "classes_present": len(present),
            "void_fraction": round(int(class_pixels[0]) / max(total, 1), 4),
            "images_per_s": round(counts["samples"] / elapsed, 1),
        }
        out.details = {
            **details(p), "label_space": space.to_json(), "failures": failures,
            "duplicates_dropped": counts["duplicates_dropped"],
            "tables": {"classes": [
                {"label": space.names[i], "group": space.groups[i], "pixels": int(n), "fraction": round(float(n) / total, 4)}
                for i, n in sorted(enumerate(class_pixels), key=lambda t: -t[1]) if n
            ]},
        }
        log.info("segment: %d samples, %d failed, %d classes present, %.1f img/s",
                 counts["samples"], counts["failed"], len(present), counts["samples"] / elapsed)
    return out.artifact
