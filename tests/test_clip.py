"""CLIP latents: train-clip, the image embeddings in the tokens, image-conditioned base, variations."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from muse.artifacts.store import ArtifactStore
from muse.config import load_config
from muse.datasets.decode import image_bytes, image_tensor
from muse.datasets.shards import shard_files
from muse.datasets.stream import iter_tar
from muse.datasets.tokens import TokenTable
from muse.models.clip import Clip, load_clip
from muse.stage import execute
from tests.conftest import SMALL

CLIP_SMALL = [
    "train_clip.model={name: ViT-B-32, embed_dim: 32, image_size: 32, patch_size: 8, vision_width: 32, "
    "vision_layers: 1, vision_head_width: 16, context_length: 16, text_width: 32, text_heads: 2, text_layers: 1}",
    "train_clip.train={steps: 40, batch_size: 8, lr: 0.002, warmup_steps: 2, checkpoint_every: 20, log_every: 10}",
]


@pytest.fixture(scope="module")
def clip_store(pipeline_store, tmp_path_factory):
    """The session's shards and tokenizers in a store of their own, plus a trained CLIP and the tokens made with it."""
    from muse.stages import tokenize, train_clip

    _, _, arts = pipeline_store
    cfg = load_config("tiny", overrides=[*SMALL, *CLIP_SMALL, "train_clip.enabled=true"])
    store = ArtifactStore(tmp_path_factory.mktemp("clip") / "store")
    for kind in ("shards", "segments", "vqgan-low", "vqgan-high", "vqseg"):
        shutil.copytree(arts[kind].path, store.root / kind / arts[kind].version)
    own = {k: store.get(k, arts[k].version) for k in ("shards", "segments", "vqgan-low", "vqgan-high", "vqseg")}
    own["clip"] = execute(train_clip, cfg, {"shards": own["shards"]}, store)
    own["tokens"] = execute(tokenize, cfg, own, store)
    return cfg, store, own


def _batch(shards, clip: Clip, n: int = 8) -> dict:
    samples = [s for f in shard_files(shards.path, "train") for _, s in iter_tar(f)][:n]
    return {"image": torch.stack([image_tensor(image_bytes(s), clip.image_size) for s in samples]),
            "tokens": clip.tokens([s["txt"].decode() for s in samples])}


def test_train_clip_lowers_the_contrastive_loss_and_retrieves_above_chance(clip_store):
    from muse.stages.train_clip import ClipObjective, retrieval
    from muse.training import seeded

    cfg, _, arts = clip_store
    trained = load_clip(arts["clip"].path)
    with seeded(cfg.train_clip.train.seed):
        untrained = Clip(cfg.train_clip.model).eval()  # the weights training started from
    batch = _batch(arts["shards"], trained)
    with torch.no_grad():
        before = float(ClipObjective(untrained).losses(batch, 0)["loss"])
        after = float(ClipObjective(trained).losses(batch, 0)["loss"])
    assert after < before * 0.8
    m = retrieval(trained, shard_files(arts["shards"].path, "train"), 8, torch.device("cpu"))
    assert m["i2t_r1"] > 2 * m["i2t_r1_chance"] and m["t2i_r5"] > m["t2i_r5_chance"]
    vm = arts["clip"].manifest.metrics
    assert vm["steps"] == 40 and vm["dim"] == 32 and {"i2t_r1", "t2i_r1", "i2t_r5_chance"} <= set(vm)


def test_an_images_clip_embedding_round_trips_through_the_tokens_parquet(clip_store):
    from muse.contracts import TokensSchema

    _, _, arts = clip_store
    clip = load_clip(arts["clip"].path)
    schema = TokensSchema.of(arts["tokens"].path)
    assert schema.image.clip == arts["clip"].ref and schema.image.dim == 32
    assert arts["tokens"].manifest.inputs["clip"] == arts["clip"].version
    table = TokenTable(arts["tokens"].path, "train", ["key", "clip_image_emb"])
    stored = {table[i]["key"]: table[i]["clip_image_emb"] for i in range(len(table))}
    samples = {k: s for f in shard_files(arts["shards"].path, "train") for k, s in iter_tar(f)}
    keys = sorted(stored)[:4]
    with torch.no_grad():
        fresh = clip.encode_images(torch.stack([image_tensor(image_bytes(samples[k]), clip.image_size) for k in keys]))
    assert torch.allclose(torch.stack([stored[k] for k in keys]), fresh, atol=2e-3)  # float16 in the parquet
    assert np.allclose(fresh.norm(dim=1).numpy(), 1, atol=1e-5)


def test_image_conditioning_drops_the_embedding_at_its_rate_and_the_base_varies_an_image(clip_store, tmp_path):
    from PIL import Image

    from muse.contracts import TransformerRecord
    from muse.generate import TextToImage
    from muse.models.transformer import MaskedTransformer, TransformerSpec
    from muse.stages import train_base
    from muse.transformer_training import CaptionMemory, MaskedObjective

    cfg, store, arts = clip_store
    section = cfg.train_base.model_copy(update={"image_conditioning": True, "image_drop_rate": 0.3})
    base = execute(train_base, cfg.model_copy(update={"train_base": section}), {"tokens": arts["tokens"]}, store)
    record = TransformerRecord.of(base.path)
    assert record.clip == arts["clip"].ref and record.spec["image_dim"] == 32
    # the dropout rate: the share of samples whose image token is hidden
    model = MaskedTransformer(TransformerSpec(dim=16, depth=1, heads=2, codebook_size=8, side=2, text_dim=4,
                                              image_dim=32))
    objective = MaskedObjective(model, "tokens_low", CaptionMemory(cfg.tokenize.text_encoder, True, "cpu"), 0.0,
                                0.0, None, image_drop_rate=0.3, seed=0)
    hidden = []
    objective.forward = lambda *a: (hidden.append(~a[7]), torch.zeros(len(a[0]), 4, 8, requires_grad=True))[1]
    batch = {"tokens_low": torch.zeros(500, 4, dtype=torch.long), "text_emb": torch.zeros(500, 2, 4),
             "text_len": torch.ones(500, dtype=torch.long), "clip_image_emb": torch.randn(500, 32)}
    objective.losses(batch, 0)
    assert abs(float(torch.cat(hidden).float().mean()) - 0.3) < 0.06
    # variations and interpolation run from an image's embedding, and differ by seed
    pipe = TextToImage(store, device="cpu", pins={"base": base})
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    variations = pipe.vary(image, n=3, superres=False)
    assert len(variations) == 3 and all(v.size == (32, 32) for v in variations)
    path = pipe.interpolate(image, Image.new("RGB", (32, 32), (30, 30, 200)), steps=3, superres=False)
    assert len(path) == 3
    # a text-diff edit turns the embedding: by 0 it is the plain variation, by 0.5 another image
    same = pipe.text_diff(image, "a red circle", "a blue circle", 0.0, superres=False)
    assert np.array_equal(np.asarray(same), np.asarray(pipe.vary(image, n=1, superres=False)[0]))
    emb = pipe.image_embeddings([image])[0]
    with torch.no_grad():
        diff = torch.nn.functional.normalize(pipe.clip.encode_captions(["a blue circle"])[0] -
                                             pipe.clip.encode_captions(["a red circle"])[0], dim=0)
    from muse.generate import slerp

    turned = slerp(emb, diff, 0.5)
    assert float(turned @ diff) > float(emb @ diff) and abs(float(turned.norm()) - 1) < 1e-5
    # an empty prompt is no caption: its text positions are hidden, as when training drops the text
    _, mask = pipe._memory(pipe.base, ["", "a red circle"])
    _, dropped = pipe._memory(pipe.base, ["a red circle"], drop=True)
    assert int(mask[0].sum()) == int(dropped[0].sum()) < int(mask[1].sum())
    # evaluate's variation figures on demo images: graded against their own objects and another image's
    from muse.datasets.shards import read_samples
    from muse.stages.evaluate import variation_alignment

    samples = [s for _, s in zip(range(4), read_samples(arts["shards"].path, "val"))]
    figures = variation_alignment(pipe, samples, cfg.sampling, cfg.evaluate)
    assert figures["variations_nearest_chance"] == 0.25 and 0 <= figures["variations_nearest_own_image"] <= 1
    assert {"alignment_colour_variations", "alignment_position_variations_other_image"} <= set(figures)
    # the commands: the store's latest base is this image-conditioned one
    from muse.cli import main

    image.save(tmp_path / "red.png")
    flags = ["--store", str(store.root), "--no-superres", "--steps", "2"]
    assert main(["vary", str(tmp_path / "red.png"), "--n", "2", "--out", str(tmp_path / "vary"), *flags]) == 0
    assert sorted(p.name for p in (tmp_path / "vary").iterdir()) == ["0000.png", "0001.png"]
    assert main(["interpolate", str(tmp_path / "red.png"), str(tmp_path / "red.png"), "--steps", "3", "--out",
                 str(tmp_path / "path"), "--store", str(store.root), "--no-superres", "--sampling-steps", "2"]) == 0
    assert len(list((tmp_path / "path").iterdir())) == 3
    assert main(["edit", str(tmp_path / "red.png"), "--from", "a red circle", "--to", "a blue circle", "--out",
                 str(tmp_path / "diff.png"), *flags]) == 0 and (tmp_path / "diff.png").is_file()
    assert main(["edit", str(tmp_path / "red.png"), "--from", "a red circle", *flags]) == 2  # no --to


def test_the_prior_beats_the_mean_embedding_and_feeds_unclip_generation(clip_store):
    from muse.generate import TextToImage
    from muse.models.prior import load_prior
    from muse.stages import train_base, train_prior
    from muse.stages.train_prior import COLUMNS, val_figures

    cfg, store, arts = clip_store
    cfg = cfg.model_copy(update={"train_prior": cfg.train_prior.model_copy(update={
        "enabled": True, "dim": 32, "train": cfg.train_prior.train.model_copy(update={
            "steps": 60, "batch_size": 8, "lr": 0.003, "warmup_steps": 2, "checkpoint_every": 30})})})
    prior = execute(train_prior, cfg, {"tokens": arts["tokens"], "clip": arts["clip"]}, store)
    m = prior.manifest.metrics
    assert m["steps"] == 60 and {"val_loss", "val_loss_mean_embedding"} <= set(m)
    # on the rows it was fitted to it must beat the mean direction (the demo's val figures are in docs/findings.md)
    model, config = load_prior(prior.path)
    train = TokenTable(arts["tokens"].path, "train", COLUMNS)
    mean = torch.nn.functional.normalize(torch.from_numpy(train.column("clip_image_emb", len(train))).float().mean(0),
                                         dim=0)
    fit = val_figures(model, train, mean, torch.device("cpu"))
    assert fit["val_loss"] < fit["val_loss_mean_embedding"] and config["clip"] == arts["clip"].ref
    section = cfg.train_base.model_copy(update={"image_conditioning": True})
    base = execute(train_base, cfg.model_copy(update={"train_base": section}), {"tokens": arts["tokens"]}, store)
    pipe = TextToImage(store, device="cpu", pins={"base": base, "prior": prior})
    assert pipe.lineage["prior"] == prior.version
    emb = pipe.prior_embeddings(["a red circle", "a blue square"])
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    tokens = pipe.generate_tokens(["a red circle"], prior=True, superres=False)["tokens_low"]
    assert tokens.shape == (1, 16)
    with pytest.raises(ValueError, match="no prior for this base"):
        TextToImage(store, device="cpu", pins={"base": base, "prior": None}).prior_embeddings(["x"])
