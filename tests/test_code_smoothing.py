"""Targets spread over nearby codes (`train_base.code_smoothing`): the loss and its optimum (the stage's knob:
`test_edge_weights`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from muse.code_smoothing import CodeSmoothing
from muse.config import VQModelConfig
from muse.models.vqgan import VQModel

TOKENIZER = VQModelConfig(arch="vqvae", resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, embed_dim=8,
                          codebook_size=32, code_dim=4, use_cosine_sim=False)


def _tokenizer() -> VQModel:
    torch.manual_seed(0)
    return VQModel(TOKENIZER).eval()


def test_without_smoothing_the_loss_is_cross_entropy_with_label_smoothing():
    """amount 0 is the one-hot loss, label smoothing included; any other amount changes it."""
    logits, tokens = torch.randn(3, 10, 32), torch.randint(0, 32, (3, 10))
    plain = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none", label_smoothing=0.1)
    assert torch.allclose(CodeSmoothing(_tokenizer(), 0.0)(logits, tokens, 0.1), plain, atol=1e-5)
    assert not torch.allclose(CodeSmoothing(_tokenizer(), 0.5)(logits, tokens, 0.1), plain, atol=1e-3)


def test_the_loss_is_least_for_predictions_that_favour_codes_near_the_target():
    """Free logits trained on one target code settle on (1 - amount) on it plus amount over its neighbours, in
    order of latent distance; the codes farthest from it get nearly nothing. One-hot training gives the others
    nothing at all."""
    tokenizer = _tokenizer()
    smoothing = CodeSmoothing(tokenizer, 0.6)
    latents = tokenizer.codes_to_latents(torch.arange(32).view(1, 1, 32)).detach()[0, :, 0].T  # [32, D]
    target = torch.tensor([[5]])
    logits = torch.zeros(1, 1, 32, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(800):
        optimizer.zero_grad()
        smoothing(logits, target, 0.0).sum().backward()
        optimizer.step()
    p = logits.detach().softmax(-1)[0, 0]
    distance = (latents - latents[5]).norm(dim=1)
    by_distance = distance.argsort()
    assert by_distance[0] == 5 and p[5] == pytest.approx(0.4 + 0.6 * float(smoothing.weights[5, 0]), abs=0.02)
    assert p[by_distance[1]] > 0.05 and p[by_distance[1]] > p[by_distance[-1]] * 20
    assert torch.all(p[by_distance[1:]].diff() <= 1e-3)  # never more mass on a farther code
    assert smoothing.weights.sum(1).allclose(torch.ones(32))
