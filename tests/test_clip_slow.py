"""CLIP latents on demo data trained for real (minutes): variations keep their image's CLIP embedding."""

from __future__ import annotations

import pytest
import torch

from muse.artifacts.store import ArtifactStore
from muse.config import load_config
from muse.datasets.shards import read_samples
from muse.stage import execute

pytestmark = pytest.mark.slow

TRAINED = [
    "demo.num_samples=1024", "demo.image_size=64", "shard.val_fraction=0.1",
    "train_vqgan.high.resolution=64", "train_vqgan.high.ch_mult=[1, 2, 4]",
    "train_vqgan.train.steps=600", "train_vqgan.overrides={high: {steps: 50}, seg: {steps: 50}}",
    "train_clip.train.steps=600", "train_base.image_conditioning=true",
    "train_base.train.steps=800",
]


def test_a_variation_is_nearer_its_own_image_than_the_others(ray_local, tmp_path):
    """The embedding of image X conditions samples whose CLIP embedding is nearer X than most other val images
    (a random one would sit in the middle) and nearest of all more often than chance."""
    from muse.generate import TextToImage, to_images
    from muse.stages import segment, shard, tokenize, train_base, train_clip, train_vqgan

    cfg = load_config("tiny", overrides=TRAINED)
    store = ArtifactStore(tmp_path / "store")
    arts = {"shards": execute(shard, cfg, {}, store)}
    arts["clip"] = execute(train_clip, cfg, arts, store)
    arts["segments"] = execute(segment, cfg, arts, store)
    arts.update({a.kind: a for a in execute(train_vqgan, cfg, arts, store)})
    arts["tokens"] = execute(tokenize, cfg, arts, store)
    arts["base"] = execute(train_base, cfg, {"tokens": arts["tokens"]}, store)
    pipe = TextToImage(store, device="cpu", pins={"base": arts["base"]})
    images = [s["image"] for _, s in zip(range(96), read_samples(arts["shards"].path, "val"))]
    variations = []
    for i in range(0, len(images), 16):
        emb = pipe.image_embeddings(images[i:i + 16])
        tokens = pipe.generate_tokens([""] * len(emb), seed=i, image_emb=emb, superres=False)
        variations += to_images(pipe.decode_tokens(tokens))
    with torch.no_grad():
        sims = pipe.image_embeddings(variations) @ pipe.image_embeddings(images).T
    own = sims.diagonal()[:, None]
    rank = float((sims > own).float().sum(1).mean() / (len(images) - 1))  # 0: always nearest; 0.5: chance
    nearest = float((sims.argmax(1) == torch.arange(len(images))).float().mean())
    print(f"variations: own image at rank {rank:.3f} of the others (chance 0.5), nearest {nearest:.3f} "
          f"(chance {1 / len(images):.3f})")
    assert rank < 0.4 and nearest > 2 / len(images)  # chance: rank 0.5 +- 0.03, nearest 1 in len(images)
