"""Mid-layer guidance: the hook, the guided step, the `train-guide` stage and guided generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from muse.artifacts.store import ArtifactStore
from muse.config import ConfigError, SamplerConfig, load_config
from muse.generate import TextToImage
from muse.guidance import capture, features_at, guidance_step, steer
from muse.labelled_grid import LINE_HEIGHT, MIN_CELL
from muse.models.guide import GuideHead, GuideSpec, load_guide
from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.sampling import decode
from muse.stage import execute
from muse.training import TrainLoop

from .conftest import SMALL


def tiny_model(depth: int = 3) -> MaskedTransformer:
    torch.manual_seed(0)
    return MaskedTransformer(TransformerSpec(dim=32, depth=depth, heads=2, codebook_size=16, side=4, text_dim=8)).eval()


def memories(model: MaskedTransformer, b: int = 2):
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(b, 5, 8, generator=gen)
    mask = torch.ones(b, 5, dtype=torch.bool)
    return (*model.memory(emb, mask), *model.memory(emb, torch.zeros_like(mask))), emb.mean(1)


def caption_head(block: int = 1) -> GuideHead:
    torch.manual_seed(2)
    return GuideHead(GuideSpec(feature_dim=32, block=block, target="caption", dim=16, text_dim=8)).eval()


@pytest.mark.parametrize("block", [0, 1, 2])
def test_the_hook_captures_the_configured_block(block):
    model = tiny_model()
    (memory, mask, _, _), _ = memories(model)
    tokens = torch.randint(0, 17, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with capture(model, block) as seen:
            model(tokens, memory, mask)
        split = features_at(model, tokens, memory, mask, block)
    assert len(seen) == 1 and seen[0].shape == (2, 16, 32)
    torch.testing.assert_close(seen[0], split)
    other = features_at(model, tokens, memory, mask, (block + 1) % 3)
    assert not torch.allclose(seen[0], other)  # negative control: another block's output differs


def test_a_step_along_the_gradient_raises_the_heads_score_and_a_negative_one_lowers_it():
    model, head = tiny_model(), caption_head()
    (memory, mask, _, _), text = memories(model)
    tokens = torch.full((2, 16), model.spec.mask_id)
    with torch.no_grad():
        features = features_at(model, tokens, memory, mask, 1)
        before = head.objective(features, text)
        up = head.objective(guidance_step(head, features, text, 0.05), text)
        down = head.objective(guidance_step(head, features, text, -0.05), text)
    assert (up > before).all() and (down < before).all()


def test_scale_zero_is_bit_identical_to_unguided_sampling_and_a_nonzero_scale_is_not():
    model, head = tiny_model(), caption_head()
    mems, text = memories(model)
    cfg = SamplerConfig(steps=4, guidance_scale=2.0)

    def sample(scale: float | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        if scale is None:
            return decode(model, *mems, cfg, gen)
        with steer(model, head, text, scale):
            return decode(model, *mems, cfg, gen)

    plain = sample(None)
    assert torch.equal(sample(0.0), plain)
    assert not torch.equal(sample(2.0), plain)
    assert torch.equal(sample(2.0), sample(2.0))  # deterministic by seed
    assert not model.blocks[1]._forward_hooks  # the hook is gone once the context closes


def test_guide_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train_guide.*field"):
        load_config("tiny", overrides=["train_guide.target=label"])
    with pytest.raises(ConfigError, match="score_bins"):
        load_config("tiny", overrides=["train_guide.target=score", "train_guide.field=x", "train_guide.score_bins=1"])


# --------------------------------------------------------------------------- the stage, on the session store


def test_train_guide_artifact_and_guided_generation(trained_store, tmp_path, capsys):
    from muse.cli import main

    cfg, store, arts = trained_store
    m = arts["guide"].manifest.metrics
    assert m["steps"] == 4 and {"val_accuracy", "val_accuracy_unmasked", "chance"} <= set(m)
    grid = np.asarray(Image.open(arts["guide"].path / "previews" / "samples-step-0000004.png"))
    # unguided, guided at 0.25, then the reconstructions: 32 px cells at 96, over the caption band
    assert grid.shape[0] == 3 * MIN_CELL + 3 * LINE_HEIGHT + 6 and grid.std() > 0
    assert (arts["guide"].path / "tensorboard").is_dir()
    head, config = load_guide(arts["guide"].path)
    assert head.spec.block == 0 and config["base"] == arts["base"].ref  # depth 1: the middle block is block 0
    assert arts["guide"].manifest.inputs["base"] == arts["base"].version
    pipe = TextToImage.from_store(store)
    assert pipe.guide is not None and pipe.lineage["guide"] == arts["guide"].version
    plain = pipe.generate_tokens(["a red circle"], seed=3, guide_scale=0.0)
    again = pipe.generate_tokens(["a red circle"], seed=3, guide_scale=0.0)
    guided = pipe.generate_tokens(["a red circle"], seed=3, guide_scale=3.0)
    assert torch.equal(plain["tokens_low"], again["tokens_low"])
    assert not torch.equal(plain["tokens_low"], guided["tokens_low"])
    assert main(["generate", "--store", str(store.root), "--out", str(tmp_path / "g"), "--guide-scale", "1.5",
                 "a blue square"]) == 0
    assert (tmp_path / "g" / "0000.png").is_file()
    guidance = arts["report"].manifest.details["tables"]["guidance"]
    assert [row["guide_scale"] for row in guidance] == [0.0, 0.25]  # the configured scale, then the compared one
    assert all(0 <= row["shape"] <= 1 and row["seconds_per_image"] > 0 for row in guidance)
    assert arts["report"].manifest.inputs["guide"] == arts["guide"].version
    no_guide = TextToImage.from_store(store, pins={"guide": None})
    with pytest.raises(ConfigError, match="no guide"):
        no_guide.generate_tokens(["a red circle"], guide_scale=1.0)


def test_resume_equals_an_uninterrupted_run(trained_store, tmp_path):
    from muse.config import TextEncoderConfig
    from muse.datasets.tokens import TokenTable, token_batches
    from muse.models.transformer import load_transformer
    from muse.stages import train_guide
    from muse.transformer_training import CaptionMemory

    cfg, _, arts = trained_store
    base, base_config = load_transformer(arts["base"].path)
    table = TokenTable(arts["tokens"].path, "train", ["key", "caption", "tokens_low", "text_emb", "text_len"])
    text = CaptionMemory(TextEncoderConfig.model_validate(base_config["text_encoder"]), True, torch.device("cpu"))
    train = cfg.train_guide.train.model_copy(update={"steps": 6, "checkpoint_every": 3, "warmup_steps": 1})

    def loop(work) -> TrainLoop:
        torch.manual_seed(0)
        head = GuideHead(GuideSpec(feature_dim=base.spec.dim, block=0, target="caption", dim=16,
                                   text_dim=base.spec.text_dim))
        return TrainLoop(train, train_guide.GuideObjective(base, head, text, None, 0), work, "guide")

    data = lambda position: token_batches(table, 4, 0, position)  # noqa: E731
    whole = loop(tmp_path / "whole")
    whole.run(data)
    part = loop(tmp_path / "part")
    part.run(data, max_steps=3)
    resumed = loop(tmp_path / "part")
    resumed.run(data)
    assert resumed.step == 6
    for k, v in whole.objective.head.state_dict().items():
        torch.testing.assert_close(resumed.objective.head.state_dict()[k], v, rtol=0, atol=0)


# --------------------------------------------------------------------------- learning, on a larger demo


@pytest.fixture(scope="module")
def label_store(tmp_path_factory, ray_local):
    """200 demo images through tokenize, a base that has learned a little (300 steps), and a guide trained on the
    background colour."""
    from muse.stages import (
        segment,
        shard,
        tokenize,
        train_base,
        train_guide,
        train_vqgan,
    )

    cfg = load_config("tiny", overrides=[
        *SMALL, "demo.num_samples=200", "shard.samples_per_shard=50", "shard.val_fraction=0.2",
        "train_vqgan.train.steps=40", "train_vqgan.train.batch_size=8", "segment.segmenters=none",
        "train_base.model={dim: 32, depth: 3, heads: 2}", "train_base.train.steps=300",
        "train_base.train.batch_size=16",
        "train_guide.target=label", "train_guide.field=source_info.background",
        "train_guide.train.steps=300", "train_guide.train.batch_size=32", "train_guide.train.lr=0.003",
        "train_guide.train.warmup_steps=5", "train_guide.dim=32"])
    store = ArtifactStore(tmp_path_factory.mktemp("guide") / "store")
    arts = {"shards": execute(shard, cfg, {}, store)}
    arts["segments"] = execute(segment, cfg, arts, store)
    arts.update({a.kind: a for a in execute(train_vqgan, cfg, arts, store)})
    arts["tokens"] = execute(tokenize, cfg, arts, store)
    arts["base"] = execute(train_base, cfg, arts, store)
    arts["guide"] = execute(train_guide, cfg, arts, store)
    return cfg, store, arts


def test_a_label_guide_learns_above_chance_and_steers_towards_its_class(label_store):
    cfg, store, arts = label_store
    m = arts["guide"].manifest.metrics
    assert m["val_accuracy_unmasked"] > m["chance"] + 0.2, m
    head, _ = load_guide(arts["guide"].path)
    assert len(head.spec.classes) >= 2
    pipe = TextToImage.from_store(store)
    with pytest.raises(ConfigError, match="not a class"):
        pipe.generate_tokens(["a shape"], sampling=pipe.resolve_sampling(guide_scale=1.0))
    wanted = head.spec.classes[0]
    prompts = [s for s in ("a shape", "a circle", "a square", "a triangle") for _ in range(4)]

    def score(scale: float) -> float:
        """The head's mean log p(wanted) on the finished grids sampled at this guide scale."""
        sampling = pipe.sampling.model_copy(update={"guide": pipe.sampling.guide.model_copy(
            update={"scale": scale, "label": wanted})})
        tokens = pipe.generate_tokens(prompts, sampling=sampling, superres=False, seed=5)["tokens_low"]
        emb, mask = pipe.text.encode(prompts)
        with torch.no_grad():
            memory, memory_mask = pipe.base.memory(emb, torch.zeros_like(mask))
            features = features_at(pipe.base, tokens, memory, memory_mask, head.spec.block)
            return float(head.objective(features, torch.full((len(prompts),), 0)).mean())

    unguided = score(0.0)
    assert head.spec.block == 1 and score(1.0) > unguided + 1.0 and score(-1.0) < unguided - 1.0


def test_a_score_guide_reports_r2_and_bins_report_accuracy(label_store):
    from muse.stages import train_guide

    cfg, store, arts = label_store
    for extra, figure in (({}, "val_r2"), ({"score_bins": 3}, "val_accuracy")):
        c = cfg.model_copy(update={"train_guide": cfg.train_guide.model_copy(update={
            "target": "score", "field": "source_info.objects.0.bbox.0", "train": cfg.train_guide.train.model_copy(
                update={"steps": 20}), **extra})})
        m = execute(train_guide, c, arts, store).manifest.metrics
        assert figure in m and m[figure] <= 1 and m["steps"] == 20
        head, _ = load_guide(store.get("guide").path)
        assert len(head.spec.bin_centres) == extra.get("score_bins", 0)
        assert list(head.spec.bin_centres) == sorted(head.spec.bin_centres)


def test_a_metadata_field_that_is_not_a_number_is_an_error_naming_the_file_and_field(label_store):
    from muse.stages import train_guide

    cfg, store, arts = label_store
    c = cfg.model_copy(update={"train_guide": cfg.train_guide.model_copy(update={
        "target": "score", "field": "source_info.background"})})
    with pytest.raises(ConfigError, match=r"\.tar: sample \d+: train_guide.field 'source_info.background' is"):
        execute(train_guide, c, arts, store)
