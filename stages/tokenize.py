"""Stage `tokenize`: every sample's token ids (and, optionally, caption embeddings) into parquet.

Consecutive shards of a split are grouped so that each group holds at least `row_group_size`
rows; one Ray Data row per group, and an actor pool whose actors hold the VQ encoders and the
text encoder (GPU when the cluster has one) turns a group into one parquet file
(`train-00000.parquet`, `val-00000.parquet`, ...) with row groups of `row_group_size` rows, so
memory stays flat however large the dataset and a rerun or a bigger cluster stays parallel per
group. Actors write into the artifact's staging directory: on a multi-node cluster the store
must be on storage every node sees. The files sit side by side with only `_`-prefixed JSON
beside them, so the artifact folder reads as one dataset (`pq.read_table(dir)`,
`pd.read_parquet(dir)`, duckdb's `read_parquet('dir/*.parquet')`, `datasets.load_dataset(
"parquet", data_dir=dir)` with its train and validation splits).

Columns (DESIGN.md "Data formats"): key, caption, split, tokens_low, tokens_high,
seg_tokens (null where segmentation failed; absent when the run has no scene maps), text_emb
(float16, padded to max_length x dim) + text_len when `precompute_text`, and micro_conds (float32
x 5: original width and height, crop top and left, aesthetic score or NaN; `muse.micro_conditions`)
from each sample's metadata; with a `clip` input (train-clip in the run), clip_image_emb (float16 x
the CLIP's width: each image's unit-length CLIP embedding). The parquet schema's
metadata (`muse`), the manifest and `_schema.json` record the token geometry, codebook sizes
and the text encoder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from muse.artifacts.store import Artifact
from muse.config import PipelineConfig, TokenizeConfig, VQModelConfig
from muse.contracts import ImageEmbeddings, TextEmbeddings, TokenGeometry, metric
from muse.datasets.decode import image_bytes, image_tensor, scene_tensor
from muse.datasets.segments import scene_maps_of
from muse.datasets.shards import SPLITS, shard_files
from muse.datasets.stream import iter_tar
from muse.datasets.tokens import (
    SCHEMA_FILE,
    SCHEMA_METADATA_KEY,
    TOKEN_COLUMNS,
    token_file,
)
from muse.micro_conditions import NAMES as MICRO_NAMES
from muse.micro_conditions import of_sample as micro_of
from muse.models.clip import load_clip
from muse.models.text import load_text_encoder
from muse.models.vqgan import from_pretrained
from muse.progress import report
from muse.ray_runtime import gpus_per_actor, init_ray
from muse.stage import StageContext

NAME = "tokenize"
INPUTS: tuple[str, ...] = ("shards", "segments", "vqgan-low", "vqgan-high", "vqseg", "clip")
OUTPUTS: tuple[str, ...] = ("tokens",)
CODE_VERSION = "4"


def inputs_of(config: PipelineConfig) -> tuple[str, ...]:
    """Every input but `clip` when the run trains no CLIP."""
    return INPUTS if config.trains_clip else tuple(k for k in INPUTS if k != "clip")

log = logging.getLogger("muse.stages.tokenize")


def config_of(config: PipelineConfig) -> dict:
    """What changes the rows: the text encoder and whether embeddings are stored (not batching or actors)."""
    c = config.tokenize
    return {"text_encoder": c.text_encoder.model_dump(mode="json"), "precompute_text": c.precompute_text,
            "row_group_size": c.row_group_size, "aesthetic_field": c.aesthetic_field}


def _as_json(geometry: dict[str, TokenGeometry], text: TextEmbeddings | None,
             image: ImageEmbeddings | None = None) -> dict:
    return {"geometry": {k: g.model_dump(mode="json") for k, g in geometry.items()},
            "text": None if text is None else text.model_dump(mode="json"),
            **({} if image is None else {"image": image.model_dump(mode="json")})}


def schema(geometry: dict[str, TokenGeometry], text: TextEmbeddings | None,
           image: ImageEmbeddings | None = None) -> pa.Schema:
    """The parquet schema for this token geometry (and text embedding shape when stored); geometry and text
    ride in its metadata, so a parquet file alone says how to read its lists."""
    fields = [pa.field("key", pa.string(), nullable=False), pa.field("caption", pa.string(), nullable=False),
              pa.field("split", pa.string(), nullable=False)]
    for column in (c for c in TOKEN_COLUMNS if c in geometry):
        side = geometry[column].side
        fields.append(pa.field(column, pa.list_(pa.uint16(), side * side), nullable=column == "seg_tokens"))
    if text is not None:
        fields += [pa.field("text_emb", pa.list_(pa.float16(), text.max_length * text.dim), nullable=False),
                   pa.field("text_len", pa.int16(), nullable=False)]
    fields.append(pa.field("micro_conds", pa.list_(pa.float32(), len(MICRO_NAMES)), nullable=False))
    if image is not None:
        fields.append(pa.field("clip_image_emb", pa.list_(pa.float16(), image.dim), nullable=False))
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(_as_json(geometry, text, image))})


def _column(values: list, field: pa.Field) -> pa.Array:
    """Python/numpy values -> an arrow array of the field's type (fixed-size lists from 2-D arrays)."""
    if isinstance(field.type, pa.FixedSizeListType) and all(v is not None for v in values):
        flat = np.stack(values).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=field.type.value_type), field.type.list_size)
    return pa.array([None if v is None else v.tolist() if isinstance(v, np.ndarray) else v for v in values],
                    type=field.type)


class ShardEncoder:
    """Ray actor: loads the tokenizers and the text encoder once, then encodes whole shards."""

    def __init__(self, models: dict[str, str], config: TokenizeConfig, num_labels: int, out_dir: str,
                 geometry: dict[str, TokenGeometry], text: TextEmbeddings | None, device: str,
                 clip: str | None = None, image: ImageEmbeddings | None = None):
        self.device = torch.device(device)
        self.models = {k: from_pretrained(p).to(self.device) for k, p in models.items()}
        self.clip = None if clip is None else load_clip(clip).to(self.device)
        self.text = load_text_encoder(config.text_encoder, self.device) if config.precompute_text else None
        self.config, self.num_labels, self.out_dir = config, num_labels, Path(out_dir)
        self.schema = schema(geometry, text, image)

    @torch.no_grad()
    def _codes(self, tokenizer: str, x: list[torch.Tensor]) -> list[np.ndarray]:
        _, codes, _ = self.models[tokenizer].encode(torch.stack(x).to(self.device))
        return list(codes.flatten(1).cpu().numpy().astype(np.uint16))

    def _encode(self, samples: list[tuple[str, dict, dict | None]], split: str) -> dict[str, list]:
        """A batch of raw (key, shard files, scene files or None) -> one list per parquet column."""
        res = {k: m.cfg.resolution for k, m in self.models.items()}
        captions = [files["txt"].decode("utf-8").strip() for _, files, _ in samples]
        images = [image_bytes(files) for _, files, _ in samples]
        cols: dict[str, list] = {"key": [k for k, _, _ in samples], "caption": captions, "split": [split] * len(samples)}
        cols["tokens_low"] = self._codes("low", [image_tensor(b, res["low"]) for b in images])
        cols["tokens_high"] = self._codes("high", [image_tensor(b, res["high"]) for b in images])
        present = [i for i, (_, _, scene) in enumerate(samples) if scene is not None]
        if "seg" in self.models:
            cols["seg_tokens"] = [None] * len(samples)
        if present:
            scenes = [scene_tensor(samples[i][2]["seg.png"], samples[i][2]["edge.png"], res["seg"], self.num_labels)
                      for i in present]
            for i, codes in zip(present, self._codes("seg", scenes)):
                cols["seg_tokens"][i] = codes
        if self.text is not None:
            emb, mask = self.text.encode(captions)
            padded = torch.zeros(len(samples), self.text.max_length, emb.shape[-1])
            padded[:, :emb.shape[1]] = (emb * mask[..., None]).cpu()
            cols["text_emb"] = list(padded.half().flatten(1).numpy())
            cols["text_len"] = mask.sum(1).cpu().tolist()
        cols["micro_conds"] = [np.asarray(micro_of(json.loads(files["json"]), self.config.aesthetic_field), np.float32)
                               for _, files, _ in samples]
        if self.clip is not None:
            size = self.clip.image_size
            with torch.no_grad():
                emb = self.clip.encode_images(torch.stack([image_tensor(b, size) for b in images]).to(self.device))
            cols["clip_image_emb"] = list(emb.half().cpu().numpy())
        return cols

    def encode_group(self, shards: list[Path], scene_paths: list[Path | None], split: str, index: int) -> dict:
        """Encode consecutive tars into `<split>-<index>.parquet`; returns rows, seconds and code histograms."""
        start = time.perf_counter()
        target = self.out_dir / token_file(split, index)
        hist = {n: np.zeros(self.models[t].cfg.codebook_size, np.int64)
                for n, t in zip(TOKEN_COLUMNS, ("low", "high", "seg")) if t in self.models}
        pending: dict[str, list] = {f.name: [] for f in self.schema}
        stats = {"rows": 0, "missing_scene": 0}

        def add(batch: list) -> None:
            cols = self._encode(batch, split)
            for name, values in cols.items():
                pending[name] += values
            for name in hist:
                present = [v for v in cols[name] if v is not None]
                if present:
                    hist[name] += np.bincount(np.concatenate(present), minlength=len(hist[name]))
            stats["rows"] += len(batch)

        def flush(writer: pq.ParquetWriter, force: bool) -> None:
            while pending["key"] and (force or len(pending["key"]) >= self.config.row_group_size):
                n = min(len(pending["key"]), self.config.row_group_size)
                table = pa.Table.from_arrays([_column(pending[f.name][:n], f) for f in self.schema], schema=self.schema)
                writer.write_table(table, row_group_size=n)
                for values in pending.values():
                    del values[:n]

        batch: list[tuple[str, dict, dict | None]] = []
        with pq.ParquetWriter(target, self.schema, compression="zstd") as writer:
            for shard, scenes_path in zip(shards, scene_paths):
                scenes = dict(iter_tar(scenes_path)) if scenes_path else {}
                for key, files in iter_tar(shard):
                    if "txt" not in files:
                        raise ValueError(f"{shard}: sample {key!r} has no caption (txt member)")
                    scene = scenes.get(key)
                    stats["missing_scene"] += scene is None and "seg" in self.models
                    batch.append((key, files, scene))
                    if len(batch) == self.config.batch_size:
                        add(batch)
                        batch = []
                        flush(writer, force=False)
            if batch:
                add(batch)
            flush(writer, force=True)
        return {"file": str(target), "split": split, **stats, "seconds": time.perf_counter() - start,
                "counts": json.dumps({k: v.tolist() for k, v in hist.items()})}

    def __call__(self, batch: dict) -> dict:
        """Ray Data: one row per group of shards in, one row of statistics per group out."""
        results = [self.encode_group([Path(p) for p in json.loads(shards)],
                                     [Path(p) if p else None for p in json.loads(scenes)], split, int(index))
                   for shards, scenes, split, index in zip(batch["shards"], batch["scenes"], batch["split"],
                                                           batch["index"])]
        return {k: [r[k] for r in results] for k in results[0]}


# ----------------------------------------------------------------------------- driver


def _code_stats(counts: np.ndarray) -> dict[str, float]:
    """Codebook usage (fraction of codes seen), perplexity, and the share of the most frequent code."""
    total = max(int(counts.sum()), 1)
    p = counts[counts > 0] / total
    return {"usage": round(float((counts > 0).mean()), 4), "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2),
            "top_code_share": round(float(counts.max() / total), 4)}


def _geometry(inputs: dict[str, Artifact], scene: bool) -> dict[str, TokenGeometry]:
    geometry = {}
    for column, kind in zip(TOKEN_COLUMNS, ("vqgan-low", "vqgan-high", "vqseg")[:3 if scene else 2]):
        model = VQModelConfig(**json.loads((inputs[kind].path / "config.json").read_text())["model"])
        geometry[column] = TokenGeometry(side=model.token_side, codebook_size=model.codebook_size,
                                         resolution=model.resolution, tokenizer=f"{kind}:{inputs[kind].version}",
                                         fsq_levels=list(model.fsq_levels) if model.quantizer == "fsq" else [])
    return geometry


def shard_groups(paths: list[Path], row_group_size: int) -> list[list[Path]]:
    """Consecutive shards, grouped so a group's rows (by the shard stats' counts) reach `row_group_size`."""
    groups, rows = [[]], 0
    for path in paths:
        if rows >= row_group_size:
            groups.append([])
            rows = 0
        groups[-1].append(path)
        rows += json.loads(path.with_suffix(".stats.json").read_text())["count"]
    return [g for g in groups if g]


def run(ctx: StageContext) -> Artifact:
    """Encode every shard of `shards` (+ its `segments` sidecar) into the `tokens` parquet dataset."""
    import ray

    config, inputs = ctx.config, ctx.inputs
    c = config.tokenize
    shards, segments = inputs["shards"], inputs["segments"]
    scene = scene_maps_of(segments)
    geometry = _geometry(inputs, scene.present)
    text = None
    if c.precompute_text:  # load once here: fails fast (weights missing) before Ray starts, and gives the width
        encoder = load_text_encoder(c.text_encoder)
        text = TextEmbeddings(encoder=c.text_encoder, dim=encoder.dim, max_length=encoder.max_length)
        del encoder
    clip = inputs.get("clip")
    image = None if clip is None else ImageEmbeddings(clip=clip.ref, dim=int(metric(clip, "dim")))
    space = segments.manifest.details["label_space"]
    items = []
    for split in SPLITS:
        for index, group in enumerate(shard_groups(shard_files(shards.path, split), c.row_group_size)):
            sidecars = [segments.path / split / path.name for path in group]
            items.append({"shards": json.dumps([str(p) for p in group]), "split": split, "index": index,
                          "scenes": json.dumps([str(p) if p.exists() else "" for p in sidecars])})
    if not items:
        raise ValueError(f"shards artifact {shards.version} has no tar files")
    init_ray(config.ray)
    gpus = gpus_per_actor(c.num_gpus)
    start = time.perf_counter()
    with ctx.commit("tokens") as out:
        models = {"low": str(inputs["vqgan-low"].path), "high": str(inputs["vqgan-high"].path)}
        if scene.present:
            models["seg"] = str(inputs["vqseg"].path)
        ds = ray.data.from_items(items).map_batches(
            ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=c.concurrency), num_gpus=gpus,
            num_cpus=c.cpus_per_actor,
            fn_constructor_kwargs={"models": models, "config": c, "num_labels": len(space),
                                   "out_dir": str(out.path), "geometry": geometry, "text": text,
                                   "device": "cuda" if gpus > 0 else "cpu",
                                   "clip": None if clip is None else str(clip.path), "image": image})
        rows = {split: 0 for split in SPLITS}
        missing = 0
        counts = {n: np.zeros(geometry[n].codebook_size, np.int64) for n in TOKEN_COLUMNS if n in geometry}
        done = 0
        for result in ds.iter_rows():
            rows[result["split"]] += result["rows"]
            missing += result["missing_scene"]
            for name, values in json.loads(result["counts"]).items():
                counts[name] += np.asarray(values, np.int64)
            done += 1
            elapsed = time.perf_counter() - start
            log.info("tokenize: %d/%d files, %d rows, %.1f samples/s, ETA %.0fs", done, len(items),
                     sum(rows.values()), sum(rows.values()) / elapsed, (len(items) - done) * elapsed / done)
            report("files", done, len(items), (len(items) - done) * elapsed / done)
        elapsed = time.perf_counter() - start
        total = sum(rows.values())
        sch, recorded = schema(geometry, text, image), _as_json(geometry, text, image)
        (out.path / SCHEMA_FILE).write_text(json.dumps(
            {"columns": {f.name: str(f.type) for f in sch}, **recorded,
             "label_space": space, "row_group_size": c.row_group_size}, indent=2))
        size = sum(p.stat().st_size for p in out.path.rglob("*.parquet"))
        usage = {name: _code_stats(counts[name]) for name in counts}
        out.metrics = {"rows": total, **{f"rows_{s}": n for s, n in rows.items()}, "missing_scene": missing,
                       "samples_per_s": round(total / elapsed, 1),
                       "tokens_per_s": round(total * sum(g.side ** 2 for g in geometry.values()) / elapsed, 1),
                       "bytes": size, **{f"{n}_{k}": v for n, u in usage.items() for k, v in u.items()}}
        out.details = {**recorded, "schema": {f.name: str(f.type) for f in sch},
                       "scene_maps": scene.present, "scene_plan": scene.plan,
                       "tables": {"codebooks": [{"column": n, **u} for n, u in usage.items()]}}
    log.info("tokenize: %d rows in %.1fs (%d without a scene map)", total, elapsed, missing)
    return out.artifact
