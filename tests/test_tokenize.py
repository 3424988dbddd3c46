"""Stage `tokenize` and the parquet token reader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from muse.datasets.decode import image_bytes, image_tensor
from muse.datasets.shards import shard_files
from muse.datasets.stream import iter_tar
from muse.datasets.tokens import TokenTable, collate, token_batches
from muse.models.vqgan import from_pretrained
from muse.stage import execute
from muse.stages import tokenize


def test_parquet_follows_the_documented_schema(pipeline_store):
    cfg, store, arts = pipeline_store
    tokens = arts["tokens"]
    files = sorted(tokens.path.rglob("*.parquet"))
    # Shards hold more rows than a row group here: one parquet file per shard, named by split, side by side.
    shards = {split: shard_files(arts["shards"].path, split) for split in ("train", "val")}
    assert [f.relative_to(tokens.path).as_posix() for f in files] == \
        sorted(f"{split}-{i:05d}.parquet" for split, paths in shards.items() for i in range(len(paths)))
    table = pq.read_table(files[0])  # plain pyarrow, no muse code
    types = {f.name: f.type for f in table.schema}
    assert types["key"] == types["caption"] == types["split"] == pa.string()
    assert types["tokens_low"] == pa.list_(pa.uint16(), 16)      # 4x4 at 32 px / f8
    assert types["seg_tokens"] == pa.list_(pa.uint16(), 64)      # 8x8 at 32 px / f4
    assert types["text_emb"] == pa.list_(pa.float16(), 32 * 384)  # max_length x MiniLM width
    assert types["text_len"] == pa.int16()
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(3).compression == "ZSTD"
    assert pq.ParquetFile(files[0]).metadata.row_group(0).num_rows == 4  # row_group_size
    info = json.loads((tokens.path / "_schema.json").read_text())
    assert info["geometry"]["tokens_high"]["side"] == 4 and info["text"]["dim"] == 384
    assert json.loads(table.schema.metadata[b"muse"]) == {"geometry": info["geometry"], "text": info["text"]}
    m = tokens.manifest.metrics
    assert m["rows"] == arts["shards"].manifest.metrics["written"] and m["missing_scene"] == 0
    for column, kind in (("tokens_low", "vqgan-low"), ("tokens_high", "vqgan-high"), ("seg_tokens", "vqseg")):
        values = np.concatenate(pq.read_table(files[0], columns=[column]).column(column).to_numpy(zero_copy_only=False))
        assert values.max() < from_pretrained(arts[kind].path).cfg.codebook_size


def test_the_artifact_folder_reads_as_one_dataset_in_common_readers(pipeline_store):
    """pyarrow, pandas, duckdb and Hugging Face datasets read the artifact folder itself, manifest beside the data."""
    import subprocess
    import sys

    import duckdb

    _, _, arts = pipeline_store
    tokens = arts["tokens"]
    rows = tokens.manifest.metrics["rows"]
    assert pq.read_table(tokens.path).num_rows == rows
    import pandas as pd

    frame = pd.read_parquet(tokens.path, columns=["key", "split"])
    assert len(frame) == rows and set(frame["split"]) == {"train", "val"}
    count = duckdb.sql(f"select count(*) from read_parquet('{tokens.path}/*.parquet')").fetchall()[0][0]
    assert count == rows
    # In a fresh process outside the checkout, whose `datasets/` folder would shadow Hugging Face's package.
    script = ("import datasets, json, sys; ds = datasets.load_dataset('parquet', data_dir=sys.argv[1], "
              "columns=['split']); print(json.dumps({k: sorted(set(v['split'])) + [v.num_rows] for k, v in ds.items()}))")
    out = subprocess.run([sys.executable, "-c", script, str(tokens.path)], cwd=tokens.path.parent, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"train": ["train", tokens.manifest.metrics["rows_train"]],
                                                        "validation": ["val", tokens.manifest.metrics["rows_val"]]}


def test_row_groups_span_shards_to_reach_row_group_size(pipeline_store, store):
    cfg, _, arts = pipeline_store
    shards = shard_files(arts["shards"].path, "train")
    counts = [json.loads(p.with_suffix(".stats.json").read_text())["count"] for p in shards]
    size = counts[0] + 1  # more rows than the first shard holds
    cfg = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"row_group_size": size})})
    out = execute(tokenize, cfg, {k: arts[k] for k in tokenize.inputs_of(cfg)}, store)
    meta = pq.ParquetFile(out.path / "train-00000.parquet").metadata
    assert meta.row_group(0).num_rows == size
    assert [r["key"] for r in TokenTable(out.path, "train", ["key"])] == \
        [r["key"] for r in TokenTable(arts["tokens"].path, "train", ["key"])]  # same rows, same order


def test_tokens_decode_like_the_encoders_codes(pipeline_store):
    cfg, store, arts = pipeline_store
    table = TokenTable(arts["tokens"].path, "train")
    row = table[0]
    shard = shard_files(arts["shards"].path, "train")[0]
    key, files = next(iter_tar(shard))
    assert row["key"] == key and row["caption"] == files["txt"].decode().strip()
    model = from_pretrained(arts["vqgan-low"].path)
    with torch.no_grad():
        x = image_tensor(image_bytes(files), model.cfg.resolution)[None]
        quantized, codes, _ = model.encode(x)
        side = model.cfg.token_side
        assert torch.equal(row["tokens_low"].view(1, side, side), codes)
        assert torch.allclose(model.decode_codes(row["tokens_low"].view(1, side, side)), model.decode(quantized),
                              atol=1e-5)
    assert row["text_emb"].shape == (32, 384) and 3 < int(row["text_len"]) <= 32
    assert row["text_emb"][int(row["text_len"]):].abs().sum() == 0  # padding is zero
    assert row["text_emb"][: int(row["text_len"])].abs().sum() > 0


def test_without_precomputed_text_the_embedding_columns_are_absent(pipeline_store, store, small_config):
    cfg, _, arts = pipeline_store
    cfg = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"precompute_text": False})})
    out = execute(tokenize, cfg, {k: arts[k] for k in tokenize.inputs_of(cfg)}, store)
    names = pq.read_schema(next(out.path.rglob("*.parquet"))).names
    assert "text_emb" not in names and "text_len" not in names and "tokens_high" in names
    assert out.version != arts["tokens"].version
    row = TokenTable(out.path, "train")[0]
    assert "text_emb" not in row


def test_reader_shards_disjointly_and_covers_every_row_once(pipeline_store):
    _, _, arts = pipeline_store
    table = TokenTable(arts["tokens"].path, "train", columns=["key"])
    assert len(table.groups) >= 3
    world = 2
    seen = []
    for rank in range(world):
        groups = table.rank_groups(epoch=0, seed=1, rank=rank, world=world)
        rows = sum(g.rows for g in groups)
        stream = table.stream(seed=1, rank=rank, world=world)
        seen.append([next(stream)["key"] for _ in range(rows)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(table[i]["key"] for i in range(len(table)))


def test_a_step_of_token_batches_reads_the_same_rows_on_one_or_two_workers_with_data_streams(pipeline_store):
    _, _, arts = pipeline_store
    table = TokenTable(arts["tokens"].path, "train", columns=["key"])

    def steps(streams, world):  # the keys of each of the first 3 global steps of 4 rows, over the ranks
        ranks = [token_batches(table, 4 // world, seed=2, rank=rank, world=world, streams=streams)
                 for rank in range(world)]
        return [{k for b in ranks for k in next(b)["key"]} for _ in range(3)]

    assert steps(2, 1) == steps(2, 2)
    assert steps(None, 1) != steps(None, 2)  # one stream per worker: the split follows the count


def test_stream_is_deterministic_and_resumes_exactly(pipeline_store):
    _, _, arts = pipeline_store
    table = TokenTable(arts["tokens"].path, "train", columns=["key", "tokens_low"])
    full = [r["key"] for _, r in zip(range(40), table.stream(seed=3))]
    assert full == [r["key"] for _, r in zip(range(40), table.stream(seed=3))]
    assert full[17:] == [r["key"] for _, r in zip(range(23), table.stream(seed=3, start=17))]
    assert full != [r["key"] for _, r in zip(range(40), table.stream(seed=4))]
    batch = next(token_batches(table, 5, seed=3))
    assert batch["tokens_low"].shape == (5, 16) and batch["tokens_low"].dtype == torch.int64


def test_collate_marks_missing_scene_tokens():
    rows = [{"seg_tokens": torch.arange(4)}, {"seg_tokens": None}]
    assert collate(rows)["seg_tokens"].tolist() == [[0, 1, 2, 3], [-1, -1, -1, -1]]


def test_missing_weights_give_a_clear_error():
    from muse.config import TextEncoderConfig
    from muse.models.text import TextEncoderUnavailable, load_text_encoder

    with pytest.raises(TextEncoderUnavailable, match="pretrained"):
        load_text_encoder(TextEncoderConfig(kind="clip"))
    with pytest.raises(TextEncoderUnavailable, match="does not exist"):
        load_text_encoder(TextEncoderConfig(kind="clip", pretrained="/nowhere/clip.pt"))
    with pytest.raises(TextEncoderUnavailable, match="t5"):
        load_text_encoder(TextEncoderConfig(kind="t5", model="/nowhere/t5"))


def test_geometry_names_the_fsq_levels_a_super_res_embeds(tmp_path):
    """The schema's geometry says which token columns are FSQ codes, and in what levels (empty for a codebook)."""
    from types import SimpleNamespace

    from muse.config import VQModelConfig
    from muse.models.vqgan import VQModel, save_pretrained

    small = dict(arch="vqvae", resolution=32, ch=8, ch_mult=(1, 2, 2), embed_dim=8)
    configs = {"vqgan-low": VQModelConfig(**small, quantizer="fsq", fsq_levels=(8, 5, 3), codebook_size=120),
               "vqgan-high": VQModelConfig(**small, codebook_size=64, code_dim=4),
               "vqseg": VQModelConfig(**small, codebook_size=32, code_dim=4)}
    inputs = {}
    for kind, cfg in configs.items():
        save_pretrained(VQModel(cfg), tmp_path / kind, 3, 3)
        inputs[kind] = SimpleNamespace(path=tmp_path / kind, version="v")
    geometry = tokenize._geometry(inputs, scene=True)
    assert geometry["tokens_low"].model_dump() == {"side": 8, "codebook_size": 120, "resolution": 32,
                                                   "tokenizer": "vqgan-low:v", "fsq_levels": [8, 5, 3]}
    assert geometry["tokens_high"].fsq_levels == [] and geometry["seg_tokens"].fsq_levels == []
