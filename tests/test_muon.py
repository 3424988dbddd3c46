"""Muon on a real masked transformer: orthogonalised steps on hidden matrices, AdamW on the rest, exact resume."""

from __future__ import annotations

import torch

from muse.config import TrainConfig
from muse.muon import MuonAdamW, orthogonalised, orthogonalised_together
from tests.test_memory import _batch, _loss, _model, _resumed_equals_whole, _train


def test_orthogonalised_flattens_the_singular_values():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    grad = u[:, :32] @ torch.diag(torch.logspace(0, -2, 32)) @ v.T  # condition number 100
    for m in (grad, grad.T):  # tall and wide
        s = torch.linalg.svdvals(orthogonalised(m))
        assert s.min() > 0.5 and s.max() < 1.25, s
    s = torch.linalg.svdvals(grad)
    assert s.max() / s.min() > 50  # the negative control: the raw gradient is far from orthogonal


def test_matrices_orthogonalised_together_match_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(*shape, generator=g) for shape in ((16, 64), (64, 16), (16, 64), (32, 32), (48, 16))]
    together = orthogonalised_together(mats)
    for m, t in zip(mats, together):
        assert t.shape == m.shape
        torch.testing.assert_close(t, orthogonalised(m), atol=1e-5, rtol=1e-4)
    # each matrix is scaled by its own norm, not its batch's: a tiny one beside a huge one still comes out orthogonal
    huge, tiny = orthogonalised_together([mats[0] * 1e3, mats[2] * 1e-3])
    for m in (huge, tiny):
        s = torch.linalg.svdvals(m)
        assert s.min() > 0.5 and s.max() < 1.25, s


def test_hidden_matrices_take_muon_and_the_rest_adamw(tmp_path):
    model, loop = _train(tmp_path, "muon", 1, optimizer="muon")
    opt = loop.optimizers["loss"]
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.cross.kv.weight", "blocks.2.mlp.2.weight",
                 "text_proj.1.weight"):
        assert id(named[name]) in muon, name
    for name in ("head.weight", "embed.tok.weight", "embed.row", "null", "blocks.0.norm1.weight",
                 "blocks.0.mlp.0.bias"):
        assert id(named[name]) not in muon, name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_a_muon_step_moves_a_hidden_matrix_along_every_direction_at_once(tmp_path):
    start = _model().blocks[0].mlp[0].weight.detach().clone()
    for optimizer, flat in (("muon", True), ("adamw", False)):
        model, _ = _train(tmp_path, optimizer, 1, optimizer=optimizer)
        s = torch.linalg.svdvals(model.blocks[0].mlp[0].weight.detach() - start)  # 32 of them
        assert (s[16] / s[0] > 0.45) == flat, (optimizer, s[0], s[16])  # AdamW's: about 0.25


def test_muon_learns_and_resumes_exactly(tmp_path):
    before = float(_loss(_model(), _batch()).detach())
    model, _ = _train(tmp_path, "muon", 30, optimizer="muon")
    assert float(_loss(model, _batch()).detach()) < before * 0.8
    whole = _resumed_equals_whole(tmp_path, "muon")
    plain, _ = _train(tmp_path, "adamw", 6)
    assert not torch.equal(plain.blocks[0].mlp[0].weight, whole.blocks[0].mlp[0].weight)
    assert TrainConfig(optimizer="muon").versioned()["optimizer"] == "muon"
