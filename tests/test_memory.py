"""Memory knobs of the training loop: activation checkpointing and the 8-bit AdamW, on a real masked transformer."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from muse.config import TrainConfig, VQLossConfig, VQModelConfig
from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.models.vqgan import AttnBlock, ResBlock, VQModel
from muse.stages.train_vqgan import ImageObjective
from muse.training import TrainLoop, checkpoint_blocks, seeded

SPEC = TransformerSpec(dim=32, depth=3, heads=4, codebook_size=16, side=4, text_dim=8)


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16, (8, 16), generator=g)
    return {"tokens": tokens, "inputs": tokens.masked_fill(torch.rand(8, 16, generator=g) < 0.5, SPEC.mask_id),
            "text": torch.randn(8, 5, 8, generator=g)}


def _loss(model: MaskedTransformer, batch: dict) -> torch.Tensor:
    memory, mask = model.memory(batch["text"], torch.ones(8, 5, dtype=torch.bool))
    return F.cross_entropy(model(batch["inputs"], memory, mask).transpose(1, 2), batch["tokens"])


class _Objective:
    def __init__(self, model: MaskedTransformer):
        self.model = model
        self.modules = {"transformer": model}
        self.optimizers = {"loss": ["transformer"]}
        self.ema: list[str] = []

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        return {"loss": _loss(self.model, batch)}


def _model() -> MaskedTransformer:
    with seeded(0):
        return MaskedTransformer(SPEC)


def _train(tmp_path, name: str, steps: int, **knobs) -> tuple[MaskedTransformer, TrainLoop]:
    model = _model()
    cfg = TrainConfig(steps=steps, lr=1e-2, warmup_steps=1, schedule="constant", checkpoint_every=2, log_every=100,
                      **knobs)
    loop = TrainLoop(cfg, _Objective(model), tmp_path / name, name)
    batch = _batch()

    def data(position):
        while True:
            yield batch

    loop.run(data)
    return model, loop


def _resumed_equals_whole(tmp_path, optimizer: str) -> MaskedTransformer:
    """Interrupted at step 4 (its checkpoint), then run on: the same weights as the run never interrupted."""
    whole, _ = _train(tmp_path, "whole", 6, optimizer=optimizer)
    _train(tmp_path, "resumed", 4, optimizer=optimizer)
    resumed, _ = _train(tmp_path, "resumed", 6, optimizer=optimizer)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    return whole


def _saved_tensors(forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """forward()'s output and how many tensors autograd keeps from it for backward."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, count


def test_activation_checkpointing_keeps_fewer_activations_for_the_same_gradients():
    plain, checkpointed = _model(), _model()
    assert checkpoint_blocks(checkpointed) == SPEC.depth
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    _, kept_plain = _saved_tensors(lambda: _loss(plain, _batch()))
    _, kept_checkpointed = _saved_tensors(lambda: _loss(checkpointed, _batch()))
    assert kept_checkpointed < kept_plain / 2, (kept_checkpointed, kept_plain)
    _loss(plain, _batch()).backward()
    _loss(checkpointed, _batch()).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    with torch.no_grad():  # sampling: no recomputation, the same logits
        assert torch.equal(_loss(plain, _batch()), _loss(checkpointed, _batch()))


def test_the_loop_trains_the_same_weights_with_activation_checkpointing(tmp_path):
    plain, _ = _train(tmp_path, "plain", 3)
    checkpointed, _ = _train(tmp_path, "checkpointed", 3, activation_checkpointing=True)
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert not torch.allclose(plain.head.weight, _model().head.weight)  # it trained
    assert TrainConfig(activation_checkpointing=True).versioned() == TrainConfig().versioned()


def test_adamw8bit_keeps_8_bit_moments_learns_and_resumes_exactly(tmp_path):
    before = float(_loss(_model(), _batch()).detach())
    model, loop = _train(tmp_path, "bnb", 30, optimizer="adamw8bit")
    assert float(_loss(model, _batch()).detach()) < before * 0.8
    state = loop.optimizers["loss"].state[model.blocks[0].mlp[0].weight]  # bitsandbytes keeps small tensors 32-bit
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    whole = _resumed_equals_whole(tmp_path, "adamw8bit")
    plain, _ = _train(tmp_path, "adamw", 6)
    assert not torch.equal(plain.head.weight, whole.head.weight)  # the 8-bit moments are another optimizer
    assert "optimizer" not in TrainConfig().versioned()  # versions made before the knob stand
    assert TrainConfig(optimizer="adamw8bit").versioned()["optimizer"] == "adamw8bit"


def test_vqgan_checkpointing_recomputes_conv_blocks_for_the_same_gradients():
    """The tokenizers' and decoder's ResBlocks and attention are checkpointed too, the GAN's adaptive weight (a
    gradient through the decoder's last layer) included."""
    cfg = VQModelConfig(resolution=32, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                        codebook_size=16, code_dim=4)
    loss = VQLossConfig(disc_start=0, disc_weight=0.5, disc_layers=2, disc_ch=8)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def gradients(checkpointed: bool) -> tuple[dict[str, torch.Tensor], int, int]:
        with seeded(0):
            objective = ImageObjective(VQModel(cfg), loss, None)
        units = checkpoint_blocks(objective.model) if checkpointed else 0
        with seeded(1):
            total, kept = _saved_tensors(lambda: objective.losses(x, 0)["gen"])
        total.backward()
        return {n: p.grad for n, p in objective.model.named_parameters() if p.grad is not None}, kept, units

    plain, kept_plain, _ = gradients(False)
    checkpointed, kept_checkpointed, units = gradients(True)
    with seeded(0):
        blocks = [m for m in VQModel(cfg).modules() if isinstance(m, (ResBlock, AttnBlock))]
    assert units == len(blocks) > 0 and any(isinstance(b, AttnBlock) for b in blocks)
    assert kept_checkpointed < kept_plain / 2, (kept_checkpointed, kept_plain)
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-5), name
