"""Outline tokens: found from pixels on demo images; `train_base.edge_weight` and `code_smoothing` need their
tokenizer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from muse.datasets.demo import make_sample
from muse.edge_weights import edge_tokens
from muse.generate import pil_to_tensor

SIDE, PATCH = 16, 2  # the tiny preset's low-res grid: 2x2-pixel tokens at 32 px


def _demo(index: int) -> tuple[torch.Tensor, np.ndarray]:
    """A demo image drawn at 32 px as [1, 3, 32, 32] in [-1, 1], and its segment-id map."""
    s = make_sample(index, SIDE * PATCH, seed=0)
    return pil_to_tensor(s.image)[None], np.asarray(s.panoptic)[:, :, 0]


def test_edge_tokens_are_the_outlines_of_demo_shapes_and_none_on_flat_colour():
    """Every token whose patch spans the boundary of a shape is an edge; no token inside one flat region (its
    patch and the pixels around it a single segment) is; a plain image has none."""
    for index in range(6):
        image, seg = _demo(index)
        edges = edge_tokens(image, SIDE).view(SIDE, SIDE).numpy()
        padded = np.pad(seg, 1, mode="edge")
        for ty in range(SIDE):
            for tx in range(SIDE):
                patch = seg[ty * PATCH:(ty + 1) * PATCH, tx * PATCH:(tx + 1) * PATCH]
                ring = padded[ty * PATCH:(ty + 1) * PATCH + 2, tx * PATCH:(tx + 1) * PATCH + 2]
                if len(np.unique(patch)) > 1:
                    assert edges[ty, tx], f"sample {index}: token ({ty}, {tx}) spans an outline"
                if len(np.unique(ring)) == 1:
                    assert not edges[ty, tx], f"sample {index}: token ({ty}, {tx}) lies inside one flat region"
        assert 0 < edges.mean() < 0.5
    flat = torch.full((1, 3, SIDE * PATCH, SIDE * PATCH), 0.3)
    assert not edge_tokens(flat, SIDE).any()


@pytest.mark.parametrize("knob, value", [("edge_weight", 4.0), ("code_smoothing", 0.6)])
def test_train_base_knobs_that_read_the_target_tokenizer_need_it(pipeline_store, tmp_path, knob, value):
    """`train_base.edge_weight` decodes the target grids with their tokenizer and `code_smoothing` reads its
    codebook: without it in the store the stage stops in one line naming the key; with it (in this store or the
    one the tokens come from), the base trains and the knob is part of the model's version."""
    from muse.artifacts.store import ArtifactStore
    from muse.config import ConfigError
    from muse.stage import execute
    from muse.stages import train_base

    cfg, _, arts = pipeline_store
    store = ArtifactStore(tmp_path / "store")
    shutil.copytree(arts["tokens"].path, store.root / "tokens" / arts["tokens"].version)
    tokens = store.get("tokens", arts["tokens"].version)
    plain_cfg = cfg.model_copy(update={"train_base": cfg.train_base.model_copy(
        update={"edge_weight": 1.0, "code_smoothing": 0.0})})
    changed = plain_cfg.model_copy(update={"train_base": plain_cfg.train_base.model_copy(update={knob: value})})
    with pytest.raises(ConfigError, match=rf"train_base.{knob} needs the tokenizer of tokens:.*tokens_low"):
        execute(train_base, changed, {"tokens": tokens}, store)
    low = arts["vqgan-low"]
    shutil.copytree(low.path, store.root / "vqgan-low" / low.version)
    base = execute(train_base, changed, {"tokens": tokens}, store)
    plain = execute(train_base, plain_cfg, {"tokens": tokens}, store)
    assert base.manifest.config["train_base"][knob] == value and base.version != plain.version
    assert base.manifest.metrics["val_masked_acc"] > 0
    # another store's tokens: their tokenizer is found in the store they were read from
    elsewhere = execute(train_base, changed, {"tokens": tokens}, ArtifactStore(tmp_path / "elsewhere"))
    assert elsewhere.manifest.config["train_base"][knob] == value
