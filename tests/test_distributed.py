"""Ray Train data parallelism: DDP over gloo averages gradients like one worker on the union batch."""

from __future__ import annotations

import sys

import pytest
import ray
import torch
import torch.nn.functional as F

from muse.config import RayConfig, WorkersConfig
from muse.distributed import fit, rank_world, wrap_ddp
from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.stage import execute
from muse.transformer_training import MaskedLM

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import tests/

SPEC = TransformerSpec(dim=32, depth=2, heads=4, codebook_size=16, side=4, text_dim=8)
BATCH = 8


def _fixed_batch():
    """8 samples with the same number of masked tokens each, so per-rank means average to the union mean."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16, (BATCH, 16), generator=g)
    order = torch.rand(BATCH, 16, generator=g).argsort(1)
    masked = order < 6
    inputs = tokens.masked_fill(masked, SPEC.mask_id)
    emb = torch.randn(BATCH, 5, 8, generator=g)
    text_mask = torch.ones(BATCH, 5, dtype=torch.bool)
    text_mask[::3, 3:] = False
    return tokens, inputs, masked, emb, text_mask


def _gradients(job: dict) -> dict:
    """One backward of the masked cross-entropy on this rank's share of the fixed batch; rank 0 saves grads."""
    rank, world = rank_world()
    torch.manual_seed(0)
    model = MaskedTransformer(SPEC)
    lm = wrap_ddp(MaskedLM(model))
    tokens, inputs, masked, emb, text_mask = (t[rank::world] for t in _fixed_batch())
    logits = lm(inputs, emb, text_mask, None, None)
    loss = F.cross_entropy(logits[masked], tokens[masked])
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, job["out"])
    return {"loss": float(loss.detach()), "world": world}


def test_two_gloo_workers_average_gradients_like_one_worker_on_the_union_batch(ray_local, tmp_path):
    one = fit(_gradients, {"out": str(tmp_path / "one.pt")}, WorkersConfig(num_workers=1), RayConfig(), tmp_path)
    two = fit(_gradients, {"out": str(tmp_path / "two.pt")}, WorkersConfig(num_workers=2), RayConfig(), tmp_path)
    assert one["world"] == 1 and two["world"] == 2
    g1, g2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for g in g1.values())
    # and the half-batch gradient alone is not the union's: the test would notice a missing all-reduce
    half = {}
    torch.manual_seed(0)
    model = MaskedTransformer(SPEC)
    tokens, inputs, masked, emb, text_mask = (t[0::2] for t in _fixed_batch())
    F.cross_entropy(MaskedLM(model)(inputs, emb, text_mask, None, None)[masked], tokens[masked]).backward()
    half = {n: p.grad for n, p in model.named_parameters()}
    assert not torch.allclose(half["head.weight"], g1["head.weight"], atol=1e-6, rtol=1e-4)


@pytest.mark.usefixtures("ray_local")
def test_train_base_on_two_ray_train_workers(pipeline_store, store):
    from muse.stages import train_base

    cfg, _, arts = pipeline_store
    tb = cfg.train_base
    cfg = cfg.model_copy(update={"train_base": tb.model_copy(update={
        "workers": WorkersConfig(num_workers=2), "train": tb.train.model_copy(update={"steps": 3})})})
    out = execute(train_base, cfg, {"tokens": arts["tokens"]}, store)
    m = out.manifest.metrics
    assert m["workers"] == 2 and m["steps"] == 3 and 0 <= m["val_masked_acc"] <= 1
    assert (out.path / "model.safetensors").is_file()
