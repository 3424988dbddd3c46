"""Editing: masks to token grids, outpaint canvases, inpainting and mask-free edits, `muse edit`, scene layouts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from muse.artifacts.store import ArtifactStore
from muse.cli import main
from muse.datasets.demo import make_sample
from muse.editing import (
    edit_tokens,
    image_tokens,
    outpaint_canvas,
    scene_tokens,
    token_mask,
)
from muse.generate import TextToImage
from muse.stage import execute


def test_token_mask_marks_every_token_a_white_pixel_touches():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 20, 10))  # 20 px wide, 10 high: 3 x 2 tokens of 8 px
    grid = token_mask(mask, 8).reshape(8, 8)
    assert grid[:2, :3].all() and grid.sum() == 6
    with pytest.raises(ValueError, match="mask is empty"):
        token_mask(Image.new("L", (64, 64), 0), 8)


@pytest.mark.parametrize("side, margin", [("all", (slice(0, 64), slice(0, 8))), ("left", (slice(0, 64), slice(0, 16))),
                                          ("top", (slice(0, 16), slice(0, 64)))])
def test_outpaint_canvas_shrinks_the_image_away_from_the_new_margin(side, margin):
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    canvas, mask = outpaint_canvas(image, 0.25, side)
    m = np.asarray(mask) > 127
    assert canvas.size == mask.size == (64, 64)
    assert m[margin].all()  # the new margin is generated
    assert m.sum() == 64 * 64 - 48 * 48  # and only it: the image keeps (1 - 0.25) of each side
    assert (np.asarray(canvas)[~m] == (200, 10, 10)).all()
    with pytest.raises(ValueError, match="fraction"):
        outpaint_canvas(image, 1.5)


def _demo_image(cfg) -> Image.Image:
    return make_sample(3, cfg.demo.image_size, cfg.demo.seed).image


def test_inpainting_keeps_every_token_outside_the_mask(trained_store):
    cfg, store, _ = trained_store
    pipe = TextToImage.from_store(store)
    image = _demo_image(cfg)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, image.size[0] // 2, image.size[1]))  # the left half
    out = edit_tokens(pipe, image, "a red circle on the left", mask, steps=4, superres_steps=2, seed=1)
    for res in ("low", "high"):
        vq = pipe.vq_low if res == "low" else pipe.vq_high
        inside = token_mask(mask, vq.cfg.token_side)
        assert torch.equal(out[f"original_{res}"], image_tokens(vq, image))
        assert torch.equal(out[f"tokens_{res}"][~inside], out[f"original_{res}"][~inside])
        assert (out[f"tokens_{res}"] != pipe.base.spec.mask_id).all()
    again = edit_tokens(pipe, image, "a red circle on the left", mask, steps=4, superres_steps=2, seed=1)
    assert all(torch.equal(out[k], again[k]) for k in out)  # deterministic by seed


def test_mask_free_editing_resamples_only_the_least_likely_tokens(trained_store):
    cfg, store, _ = trained_store
    pipe = TextToImage.from_store(store)
    image = _demo_image(cfg)
    n = pipe.base.spec.side ** 2
    out = edit_tokens(pipe, image, "a blue square at the top", None, steps=4, superres_steps=2,
                      mask_free_iterations=2, mask_free_fraction=0.25)
    changed_low = out["tokens_low"] != out["original_low"]
    assert changed_low.sum() <= 2 * round(0.25 * n)
    # super-res tokens change only under base tokens that changed
    high_side, low_side = pipe.vq_high.cfg.token_side, pipe.vq_low.cfg.token_side
    under = torch.nn.functional.interpolate(changed_low.float().reshape(1, 1, low_side, low_side),
                                            size=(high_side, high_side)).bool().reshape(1, -1)
    assert torch.equal(out["tokens_high"][~under], out["original_high"][~under])


def test_edit_cli_inpaints_outpaints_and_rejects_bad_input(trained_store, tmp_path, capsys):
    cfg, store, _ = trained_store
    image_path, mask_path = tmp_path / "in.png", tmp_path / "mask.png"
    image = _demo_image(cfg)
    image.save(image_path)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, 16, 16))
    mask.save(mask_path)
    common = ["--steps", "2", "--superres-steps", "2", "--store", str(store.root)]
    assert main(["edit", str(image_path), "--prompt", "a red square", "--mask", str(mask_path),
                 "--out", str(tmp_path / "a.png"), *common]) == 0
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    assert main(["edit", str(image_path), "--prompt", "a red square", "--outpaint", "0.25", "--outpaint-side", "right",
                 "--out", str(tmp_path / "b.png"), *common]) == 0
    assert main(["edit", str(image_path), "--prompt", "a red square", "--no-mask", "--iterations", "1",
                 "--out", str(tmp_path / "c.png"), *common]) == 0
    assert all((tmp_path / f"{x}.png").is_file() for x in "abc")
    capsys.readouterr()
    assert main(["edit", str(image_path), "--prompt", "x", "--mask", str(mask_path), "--no-mask", *common]) == 2
    assert "choose one edit" in capsys.readouterr().err
    Image.new("L", (10, 10), 255).save(tmp_path / "small.png")
    assert main(["edit", str(image_path), "--prompt", "x", "--mask", str(tmp_path / "small.png"), *common]) == 2
    assert "small.png: mask is 10x10" in capsys.readouterr().err


def test_scene_layout_conditions_a_base_model_trained_with_scene_tokens(trained_store, tmp_path, capsys):
    from muse.stages import train_base

    cfg, store, arts = trained_store
    # without scene tokens in training, --scene is refused with the config key to change
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "labels.png")
    assert main(["generate", "x", "--scene", str(tmp_path / "labels.png"), "--out", str(tmp_path / "o"),
                 "--store", str(store.root)]) == 2
    assert "train_base.scene_conditioning" in capsys.readouterr().err

    own = ArtifactStore(tmp_path / "store")
    shutil.copytree(store.root, own.root)
    cfg = cfg.model_copy(update={"train_base": cfg.train_base.model_copy(update={"scene_conditioning": True})})
    base = execute(train_base, cfg, {"tokens": own.get("tokens")}, own)
    assert base.version != arts["base"].version
    pipe = TextToImage.from_store(own)
    assert pipe.lineage["vqseg"] == arts["vqseg"].version

    labels = np.zeros((32, 32), np.int64)
    labels[4:16, 4:16] = pipe.vq_seg.encoder.net[0].in_channels - 2  # the last label: a demo shape class
    scene = scene_tokens(pipe.vq_seg, labels)
    assert scene.shape == (1, pipe.base.spec.scene_side ** 2)
    text_emb, text_mask = pipe.text.encode(["a red square"])
    with_scene = pipe.base.memory(text_emb, text_mask, None, scene)[0]
    without = pipe.base.memory(text_emb, text_mask, None, None)[0]
    assert with_scene.shape[1] == without.shape[1] + scene.shape[1]
    a = pipe.generate_tokens(["a red square"], steps=3, superres_steps=2, scene=scene, seed=0)
    assert a["tokens_low"].shape == (1, pipe.base.spec.side ** 2)

    bad = tmp_path / "bad.png"
    Image.fromarray(np.full((32, 32), 250, np.uint8)).save(bad)
    assert main(["generate", "x", "--scene", str(bad), "--out", str(tmp_path / "o"), "--store", str(own.root)]) == 2
    assert f"{bad}: label map has ids outside" in capsys.readouterr().err
    assert main(["generate", "a red square", "--scene", str(tmp_path / "labels.png"), "--steps", "2",
                 "--out", str(tmp_path / "o"), "--store", str(own.root)]) == 0


def test_img2img_strength_zero_keeps_the_image_and_more_strength_changes_more(trained_store, tmp_path, capsys):
    """diffusers' img2img semantics: strength 0 returns the image's own tokens; strength 1 re-masks every base
    token; in between, the schedule's share at that step, in random positions, deterministic by seed."""
    from muse.editing import img2img_mask

    cfg, store, _ = trained_store
    pipe = TextToImage.from_store(store)
    image = _demo_image(cfg)
    kept = edit_tokens(pipe, image, "a blue square at the top", steps=8, superres_steps=2, strength=0.0)
    assert torch.equal(kept["tokens_low"], kept["original_low"]) and torch.equal(kept["tokens_high"],
                                                                                 kept["original_high"])
    n = pipe.base.spec.side ** 2
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    counts = [int(img2img_mask(n, s, 8, gen())[0].sum()) for s in (0.0, 0.25, 0.5, 1.0)]
    assert counts[0] == 0 and counts[-1] == n and counts == sorted(counts) and 0 < counts[1] < counts[2] < n
    assert img2img_mask(n, 0.5, 8, gen())[1] == 4  # decoded in the last half of the steps
    half = edit_tokens(pipe, image, "a blue square at the top", steps=8, superres_steps=2, strength=0.5, seed=2)
    again = edit_tokens(pipe, image, "a blue square at the top", steps=8, superres_steps=2, strength=0.5, seed=2)
    assert all(torch.equal(half[k], again[k]) for k in half)
    changed = int((half["tokens_low"] != half["original_low"]).sum())
    assert changed <= counts[2] and (half["tokens_low"] != pipe.base.spec.mask_id).all()
    with pytest.raises(ValueError, match="not both"):
        edit_tokens(pipe, image, "x", Image.new("L", image.size, 255), strength=0.5)

    src = tmp_path / "in.png"
    image.save(src)
    assert main(["edit", str(src), "--prompt", "a red circle", "--strength", "0", "--store", str(store.root),
                 "--out", str(tmp_path / "same.png")]) == 0
    assert "base tokens changed: 0/" in capsys.readouterr().err
    assert main(["edit", str(src), "--prompt", "a red circle", "--strength", "1.5", "--store", str(store.root)]) == 2
    assert "--strength 1.5: must be in [0, 1]" in capsys.readouterr().err
