"""Masked transformers: masking, the objective, the sampler, and the train-base / train-superres stages."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy import stats

from muse.masking import mask_tokens, masked_after_step, sample_mask_rate
from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.config import SamplerConfig
from muse.sampling import decode, guidance_at, guided_logits

SPEC = TransformerSpec(dim=32, depth=2, heads=4, codebook_size=16, side=4, text_dim=8)


def _memory(model, b=2, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.memory(torch.randn(b, length, model.spec.text_dim, generator=g), torch.ones(b, length, dtype=torch.bool))


def _decode_recorded(model, memory, mask, cfg, seed):
    """(decoded grids, the grid the model saw at each step) of an unguided decode."""
    history = []
    original = model.forward

    def forward(tokens, *args, **kwargs):
        history.append(tokens.clone())
        return original(tokens, *args, **kwargs)

    model.forward = forward
    try:
        out = decode(model, memory, mask, None, None, cfg, torch.Generator().manual_seed(seed))
    finally:
        model.forward = original
    return out, history


def test_mask_rate_follows_the_arccos_density():
    r = sample_mask_rate(200_000, torch.Generator().manual_seed(0))
    assert float(r.mean()) == pytest.approx(2 / math.pi, abs=0.005)
    ks = stats.kstest(r.numpy(), lambda x: 2 / math.pi * torch.asin(torch.as_tensor(x)).numpy())
    assert ks.pvalue > 0.01
    uniform = stats.kstest(torch.rand(200_000).numpy(), lambda x: 2 / math.pi * torch.asin(torch.as_tensor(x)).numpy())
    assert uniform.pvalue < 1e-6  # the test can tell a wrong distribution apart


def test_uniform_and_beta_mask_rates_and_an_unknown_name_is_refused():
    r = sample_mask_rate(200_000, torch.Generator().manual_seed(0), distribution="uniform")
    assert float(r.mean()) == pytest.approx(0.5, abs=0.005)
    assert stats.kstest(r.numpy(), "uniform").pvalue > 0.01
    arccos = sample_mask_rate(200_000, torch.Generator().manual_seed(0))
    assert stats.kstest(arccos.numpy(), "uniform").pvalue < 1e-6  # the test can tell the default apart
    beta = sample_mask_rate(200_000, torch.Generator().manual_seed(0), distribution="beta")
    assert stats.kstest(beta.numpy(), stats.beta(2, 2).cdf).pvalue > 0.01
    assert stats.kstest(r.numpy(), stats.beta(2, 2).cdf).pvalue < 1e-6  # and uniform from Beta(2, 2)
    with pytest.raises(ValueError, match="'cosine'.*arccos, uniform, beta"):
        sample_mask_rate(4, distribution="cosine")


@pytest.mark.parametrize("mask_rate, mean, std", [("arccos", 2 / math.pi, (0.5 - 4 / math.pi ** 2) ** 0.5),
                                                   ("uniform", 0.5, 12 ** -0.5), ("beta", 0.5, 20 ** -0.5)])
def test_the_objective_masks_at_the_rates_of_its_mask_rate_knob(mask_rate, mean, std):
    """The stage's knob reaches the masks the model is trained on: the masked fraction of many grids has the
    distribution's mean (ceil(r n) of n = 64 tokens adds 1/128 on average) and spread (uniform and beta share
    a mean; their spreads are 0.065 apart)."""
    from muse.transformer_training import MaskedObjective

    model = MaskedTransformer(TransformerSpec(dim=16, depth=1, heads=2, codebook_size=16, side=8, text_dim=8))
    seen = []
    original = model.forward
    model.forward = lambda inputs, *a, **k: seen.append(inputs == model.spec.mask_id) or original(inputs, *a, **k)
    objective = MaskedObjective(model, "tokens_low", _text, text_drop_rate=0.0, label_smoothing=0.0, cond=None,
                                mask_rate=mask_rate)
    with torch.no_grad():
        objective.losses({"tokens_low": torch.randint(0, 16, (4000, 64)), "text_emb": torch.randn(4000, 3, 8)}, 0)
    fraction = float(seen[0].float().mean())
    assert fraction == pytest.approx(mean + 1 / 128, abs=0.015)
    assert float(seen[0].float().mean(1).std()) == pytest.approx(std, abs=0.01)


def test_mask_tokens_masks_ceil_r_n_positions():
    tokens = torch.arange(16).repeat(3, 1)
    masked, mask = mask_tokens(tokens, torch.tensor([0.0, 0.5, 1.0]), 99, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [1, 8, 16]
    assert torch.equal(masked[~mask], tokens[~mask]) and (masked[mask] == 99).all()


def _text(batch):
    """A caption memory of the batch's own embeddings, every position visible."""
    return batch["text_emb"], torch.ones(batch["text_emb"].shape[:2], dtype=torch.bool)


def _logit_grads(model, objective, rows: int) -> torch.Tensor:
    """[rows, 16] |d loss / d logits| summed over the codebook, for one batch of random 4x4 grids (0 where a
    token was not masked)."""
    outputs = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        outputs["logits"] = output

    model.head.register_forward_hook(keep_logits)
    batch = {"tokens_low": torch.randint(0, 16, (rows, 16)), "text_emb": torch.randn(rows, 3, 8)}
    objective.losses(batch, 0)["loss"].backward()
    return outputs["logits"].grad.abs().sum(-1)


def test_loss_only_on_masked_positions_and_text_drop_rate():
    from muse.transformer_training import MaskedObjective

    torch.manual_seed(0)
    model = MaskedTransformer(SPEC)
    seen = {}
    original_memory = model.memory

    def memory(emb, mask, *args):
        seen["text_visible"] = mask.any(1)
        return original_memory(emb, mask, *args)

    model.memory = memory
    grad_per_position = _logit_grads(model, MaskedObjective(model, "tokens_low", _text, text_drop_rate=0.3,
                                                            label_smoothing=0.0, cond=None), 4000)
    masked = grad_per_position > 0
    counts = masked.sum(1).float()
    assert 0 < counts.min() and counts.mean() == pytest.approx(16 * 2 / math.pi, rel=0.05)  # ~ceil(r n), r~arccos
    assert float(1 - seen["text_visible"].float().mean()) == pytest.approx(0.3, abs=0.03)


def test_the_loss_weighs_each_masked_token_by_its_edge_weight():
    """With weights w per token (`edge_weight`) the masked-token loss is their weighted mean, so the gradient
    each masked position's logits get scales with w (here 5 on half the grid against 1); without, alike."""
    from muse.transformer_training import MaskedObjective

    heavy = torch.zeros(16, dtype=torch.bool)
    heavy[:8] = True

    def ratio(edge_weights) -> float:
        torch.manual_seed(0)
        model = MaskedTransformer(SPEC)
        grad = _logit_grads(model, MaskedObjective(model, "tokens_low", _text, text_drop_rate=0.0,
                                                   label_smoothing=0.0, cond=None, edge_weights=edge_weights), 2000)
        return float(grad[:, heavy][grad[:, heavy] > 0].mean() / grad[:, ~heavy][grad[:, ~heavy] > 0].mean())

    assert ratio(lambda tokens: 1 + 4 * heavy.expand_as(tokens).float()) == pytest.approx(5, rel=0.1)
    assert ratio(None) == pytest.approx(1, rel=0.1)


def test_superres_uses_its_low_res_condition():
    spec = TransformerSpec(dim=32, depth=2, heads=4, codebook_size=16, side=8, text_dim=8, cond_codebook_size=12,
                           cond_side=4)
    torch.manual_seed(0)
    model = MaskedTransformer(spec).eval()
    emb, mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    tokens = torch.full((1, 64), spec.mask_id)
    cond = torch.randint(0, 12, (1, 16))
    a = model(tokens, *model.memory(emb, mask, cond))
    b = model(tokens, *model.memory(emb, mask, torch.zeros_like(cond)))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="cond_tokens"):
        model.memory(emb, mask)


def test_fsq_low_res_ids_are_embedded_per_level():
    """An FSQ id's digits are its levels (the quantizer's own decomposition); ids sharing a level share its vector."""
    from vector_quantize_pytorch import FSQ

    from muse.models.transformer import LevelEmbedding

    levels = (8, 5, 3)
    ids = torch.arange(8 * 5 * 3)
    torch.manual_seed(0)
    embed = LevelEmbedding(levels, 16)
    digits = (ids[:, None] // embed.basis) % embed.radix
    assert torch.equal(digits, FSQ(list(levels)).indices_to_level_indices(ids).long())
    expected = sum(embed.table.weight[digits[:, i] + embed.offset[i]] for i in range(3))
    assert torch.allclose(embed(ids), expected)
    spec = TransformerSpec(dim=32, depth=1, heads=4, codebook_size=16, side=8, text_dim=8, cond_codebook_size=120,
                           cond_side=4, cond_levels=levels)
    model = MaskedTransformer(spec)
    assert isinstance(model.cond_embed.tok, LevelEmbedding) and model.cond_embed.tok.table.num_embeddings == 16
    emb, mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    memory, _ = model.memory(emb, mask, torch.randint(0, 120, (1, 16)))
    assert memory.shape == (1, 1 + 16 + 3, 32)


def test_superres_spec_takes_the_fsq_levels_from_the_tokens_geometry():
    from muse.config import load_config
    from muse.contracts import TokenGeometry
    from muse.transformer_training import transformer_spec

    model_cfg = load_config("tiny").train_superres.model
    low = {"side": 8, "codebook_size": 1000, "resolution": 64, "tokenizer": "vqgan-low:v", "fsq_levels": [8, 5, 5, 5]}
    high = {"side": 16, "codebook_size": 256, "resolution": 128, "tokenizer": "vqgan-high:v", "fsq_levels": []}
    geometry = {"tokens_low": TokenGeometry(**low), "tokens_high": TokenGeometry(**high)}
    spec = transformer_spec(model_cfg, geometry, 384, "tokens_high", "tokens_low", False)
    assert spec.cond_levels == (8, 5, 5, 5) and spec.cond_codebook_size == 1000 and spec.codebook_size == 256
    old_low = TokenGeometry(**{k: v for k, v in low.items() if k != "fsq_levels"})  # tokenize code version 1
    assert transformer_spec(model_cfg, {**geometry, "tokens_low": old_low}, 384, "tokens_high",
                            "tokens_low", False).cond_levels == ()
    assert transformer_spec(model_cfg, geometry, 384, "tokens_low", None, False).cond_levels == ()


def _aligned_super_res(**spec) -> tuple[MaskedTransformer, tuple, torch.Tensor]:
    """A super-res model with the aligned condition (8x8 from 4x4), its (text, mask, low-res tokens), memory."""
    torch.manual_seed(0)
    model = MaskedTransformer(TransformerSpec(dim=32, depth=1, heads=4, codebook_size=16, side=8, text_dim=8,
                                              cond_codebook_size=12, cond_side=4, cond_aligned=True, **spec)).eval()
    inputs = (torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), torch.randint(0, 12, (1, 16)))
    return model, inputs, model.memory(*inputs)[0]


def test_aligned_condition_reaches_each_high_res_token_from_its_own_low_res_token():
    model, _, memory = _aligned_super_res()
    added = model._aligned_cond(memory).view(8, 8, 32)
    encoded = model.cond_to_input(memory[0, 1:17]).view(4, 4, 32)
    for r, c in [(0, 0), (1, 1), (2, 5), (7, 6)]:
        assert torch.allclose(added[r, c], encoded[r // 2, c // 2])  # the 2x2 block under each low-res token
    with pytest.raises(ValueError, match="multiple of the low-res side"):
        MaskedTransformer(TransformerSpec(dim=32, depth=1, heads=4, codebook_size=16, side=6, text_dim=8,
                                          cond_codebook_size=12, cond_side=4, cond_aligned=True))


def test_subpixel_condition_gives_each_position_of_a_low_res_cell_its_own_vector_from_the_neighbourhood():
    model, inputs, memory = _aligned_super_res(cond_upsample="subpixel")
    added = model._aligned_cond(memory).view(8, 8, 32)
    assert not torch.allclose(added[2, 2], added[2, 3])  # one low-res token, two positions: two vectors
    # a neighbour of the low-res token (not the token itself) moves it; one two cells away does not
    changed = memory.clone()
    changed[0, 1 + 1 * 4 + 2] += 1.0  # low-res cell (1, 2), next to cell (1, 1) under position (2, 2)
    moved = model._aligned_cond(changed).view(8, 8, 32)
    assert not torch.allclose(moved[2, 2], added[2, 2]) and torch.allclose(moved[2, 0], added[2, 0])
    tokens = torch.full((1, 64), model.spec.mask_id)
    assert model(tokens, *model.memory(*inputs)).shape == (1, 64, 16)


def test_cached_memory_kv_equals_uncached():
    torch.manual_seed(0)
    model = MaskedTransformer(SPEC).eval()
    memory, mask = _memory(model)
    tokens = torch.randint(0, 17, (2, 16))
    assert torch.allclose(model(tokens, memory, mask), model(tokens, memory, mask, model.memory_kv(memory)), atol=1e-6)


def test_weights_saved_with_separate_self_attention_projections_still_load(tmp_path):
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    from muse.models.transformer import load_transformer

    torch.manual_seed(0)
    model = MaskedTransformer(SPEC).eval()
    old = {}
    for k, v in model.state_dict().items():  # the layout before q/k/v were fused: attn.q + attn.kv
        if k.endswith(".attn.qkv.weight"):
            old[k.replace("qkv", "q")], old[k.replace("qkv", "kv")] = v[:SPEC.dim].clone(), v[SPEC.dim:].clone()
        else:
            old[k] = v
    save_file(old, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"spec": asdict(SPEC)}))
    loaded, _ = load_transformer(tmp_path)
    memory, mask = _memory(model)
    tokens = torch.randint(0, 17, (2, 16))
    assert torch.equal(loaded(tokens, memory, mask), model(tokens, memory, mask))


def test_guidance_formula_and_linear_ramp():
    assert [guidance_at(s, 5, 2.0, "linear") for s in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert guidance_at(0, 5, 2.0, "constant") == 2.0
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert torch.allclose(guided_logits(c, u, 2.0), 3 * c - 2 * u)


def test_sampler_schedule_known_tokens_and_determinism():
    torch.manual_seed(0)
    model = MaskedTransformer(SPEC).eval()
    memory, mask = _memory(model)
    u_memory, u_mask = model.memory(torch.zeros(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool))
    cfg = SamplerConfig(steps=6, guidance_scale=2.0)
    history = []
    original = model.forward

    def forward(tokens, *args, **kwargs):
        history.append(tokens[:2].clone())
        return original(tokens, *args, **kwargs)

    model.forward = forward
    out = decode(model, memory, mask, u_memory, u_mask, cfg, torch.Generator().manual_seed(1))
    assert (out < 16).all() and len(history) == 6
    masked_counts = [int((h[0] == 16).sum()) for h in history]
    assert masked_counts == [16] + [masked_after_step(s, 6, 16) for s in range(5)]
    for before, after in zip(history, history[1:] + [out]):
        known = before != 16
        assert torch.equal(after[known], before[known])  # unmasked tokens never change
    model.forward = original
    again = decode(model, memory, mask, u_memory, u_mask, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    # Inpainting: tokens outside the region stay bit-identical.
    init = out.clone()
    init[:, :5] = 16
    inpainted = decode(model, memory, mask, u_memory, u_mask, cfg, torch.Generator().manual_seed(2), init)
    assert torch.equal(inpainted[:, 5:], out[:, 5:]) and (inpainted[:, :5] < 16).all()


def test_batched_guidance_equals_two_separate_passes():
    torch.manual_seed(0)
    model = MaskedTransformer(SPEC).eval()
    memory, mask = _memory(model)
    u_memory, u_mask = model.memory(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
    tokens = torch.randint(0, 17, (2, 16))
    both = model(torch.cat([tokens, tokens]), torch.cat([memory, u_memory]), torch.cat([mask, u_mask]))
    assert torch.allclose(both[:2], model(tokens, memory, mask), atol=1e-5)
    assert torch.allclose(both[2:], model(tokens, u_memory, u_mask), atol=1e-5)


def _train_masked(work, spec, steps, max_steps=None, rank=0):
    """A masked transformer trained by the real objective and loop on a fixed token stream; its final weights."""
    from muse.config import TrainConfig
    from muse.training import TrainLoop, seeded
    from muse.transformer_training import MaskedObjective

    with seeded(0):
        model = MaskedTransformer(spec)
    text = lambda batch: (batch["text_emb"], torch.ones(batch["text_emb"].shape[:2], dtype=torch.bool))  # noqa: E731
    objective = MaskedObjective(model, "tokens_low", text, text_drop_rate=0.1, label_smoothing=0.0, cond=None, seed=0)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=3, log_every=100)
    loop = TrainLoop(cfg, objective, work, "masked", rank=rank)

    def data(position):  # batch i is a function of i alone, so a resumed stream continues the same data
        for i in range(position // 8, 10**6):
            g = torch.Generator().manual_seed(i)
            yield {"tokens_low": torch.randint(0, spec.codebook_size, (8, spec.side ** 2), generator=g),
                   "text_emb": torch.randn(8, 3, spec.text_dim, generator=g)}

    loop.run(data, max_steps=max_steps)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_masked_training_is_reproducible_beside_a_concurrent_one_and_resumes_exactly(tmp_path):
    """train-base and train-superres train in threads of one process: neither may take the other's random draws."""
    import threading

    other_spec = TransformerSpec(dim=32, depth=1, heads=4, codebook_size=16, side=8, text_dim=8)
    alone = _train_masked(tmp_path / "alone", SPEC, steps=6)
    results = {}
    threads = [threading.Thread(target=lambda: results.update(a=_train_masked(tmp_path / "a", SPEC, steps=6))),
               threading.Thread(target=lambda: results.update(b=_train_masked(tmp_path / "b", other_spec, steps=12)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {"a", "b"}
    assert all(torch.equal(alone[k], results["a"][k]) for k in alone)
    # killed after 3 steps, resumed by fresh objects: the masks continue from the checkpointed generator
    _train_masked(tmp_path / "resumed", SPEC, steps=6, max_steps=3)
    resumed = _train_masked(tmp_path / "resumed", SPEC, steps=6)
    assert all(torch.equal(alone[k], resumed[k]) for k in alone)


def _digest(weights: dict[str, torch.Tensor]) -> str:
    import hashlib

    return hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()


def test_a_data_parallel_rank_draws_the_same_masks_in_every_process(tmp_path):
    """A rank > 0 reseeds its masks and dropout from (seed, rank, step): nothing in that may change from one
    process to the next (a str's hash does, with PYTHONHASHSEED), or its share of every run differs."""
    import os
    import subprocess
    import sys

    script = ("import sys; from tests.test_transformer import SPEC, _digest, _train_masked; "
              "print(_digest(_train_masked(sys.argv[1], SPEC, steps=2, rank=1)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = [subprocess.run([sys.executable, "-c", script, str(tmp_path / f"r{seed}")], cwd=root, check=True,
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}
                              ).stdout.split()[-1] for seed in (1, 2)]
    assert digests[0] == digests[1]
    # and the rank's draws are its own, not rank 0's
    assert digests[0] != _digest(_train_masked(tmp_path / "r0", SPEC, steps=2))


def test_patched_transformer_runs_its_blocks_on_merged_positions_and_predicts_every_token():
    torch.manual_seed(0)
    spec = TransformerSpec(dim=32, depth=2, heads=4, codebook_size=16, side=8, text_dim=8, patch=2)
    model = MaskedTransformer(spec).eval()
    memory, mask = _memory(model)
    tokens = torch.randint(0, 17, (2, 64))
    assert model.hidden(tokens, memory, mask).shape == (2, 16, 32) and model(tokens, memory, mask).shape == (2, 64, 16)
    # the split is the merge's layout inverted: position (r, c) comes back to (r, c)
    x = torch.arange(64 * 32, dtype=torch.float).view(1, 64, 32)
    grid = torch.nn.functional.pixel_unshuffle(x.transpose(1, 2).reshape(1, 32, 8, 8), 2)
    assert torch.equal(model._unmerged(grid.flatten(2).transpose(1, 2)), x)
    # a token reaches the blocks only through its own 2x2 block's position
    merged = model._merged(model.embed(tokens))
    changed = tokens.clone()
    changed[:, 8 * 2 + 3] = (changed[:, 8 * 2 + 3] + 1) % 16  # row 2, column 3: block (1, 1)
    moved = (model._merged(model.embed(changed)) - merged).abs().sum(-1)
    assert (moved[:, 1 * 4 + 1] > 0).all() and (moved.sum(1) == moved[:, 5]).all()
    unpatched = MaskedTransformer(TransformerSpec(dim=32, depth=2, heads=4, codebook_size=16, side=8, text_dim=8))
    assert model.flops_per_token(6) < 0.5 * unpatched.flops_per_token(6)
    with pytest.raises(ValueError, match="does not divide"):
        MaskedTransformer(TransformerSpec(dim=32, depth=1, heads=4, codebook_size=16, side=6, text_dim=8, patch=4))


@pytest.mark.parametrize("patch", [1, 2])
def test_a_patched_transformer_learns_tokens_that_differ_inside_each_block(patch):
    """Each 2x2 block holds four different codes, set by the caption: a merged position must still tell its four
    tokens apart (through its split and each token's own input), as an unmerged one does."""
    from muse.transformer_training import MaskedObjective

    torch.manual_seed(0)
    spec = TransformerSpec(dim=32, depth=2, heads=4, codebook_size=16, side=8, text_dim=8, patch=patch)
    model = MaskedTransformer(spec)
    patterns = torch.randint(0, 16, (4, 64))
    captions = torch.randn(4, 3, 8)
    text = lambda batch: (batch["text_emb"], torch.ones(batch["text_emb"].shape[:2], dtype=torch.bool))  # noqa: E731
    objective = MaskedObjective(model, "tokens_low", text, text_drop_rate=0.0, label_smoothing=0.0, cond=None)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for step in range(300):
        pick = torch.randint(0, 4, (32,))
        loss = objective.losses({"tokens_low": patterns[pick], "text_emb": captions[pick]}, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():  # every token masked: the caption alone must give the pattern
        logits = model(torch.full((4, 64), spec.mask_id), *model.memory(captions, torch.ones(4, 3, dtype=torch.bool)))
    assert float((logits.argmax(-1) == patterns).float().mean()) > 0.95


def test_halton_order_spreads_the_first_positions_and_the_sampler_keeps_them_in_that_order():
    from muse.sampling import halton_order

    rank = halton_order(8)
    assert sorted(rank.tolist()) == list(range(64))
    first = [int(p) for p in rank.argsort()[:16]]  # the first quarter of the sequence: 3 to 5 in every quadrant
    assert sorted(Counter((p // 8 >= 4, p % 8 >= 4) for p in first).values()) == [3, 4, 4, 5]
    torch.manual_seed(0)
    model = MaskedTransformer(SPEC).eval()
    memory, mask = _memory(model)
    cfg = SamplerConfig(steps=16, guidance_scale=0.0, order="halton")
    out, history = _decode_recorded(model, memory, mask, cfg, 0)
    assert (out < 16).all()
    unmasked = [int(((after != 16) & (before == 16))[0].nonzero()[0]) for before, after in
                zip(history, history[1:] + [out]) if ((after != 16) & (before == 16))[0].sum() == 1]
    order = halton_order(4)
    assert [int(order[p]) for p in unmasked] == sorted(int(order[p]) for p in unmasked)
    assert len(unmasked) >= 8
    confidence = decode(model, memory, mask, None, None, cfg.model_copy(update={"order": "confidence"}),
                        torch.Generator().manual_seed(0))
    assert not torch.equal(confidence, out)  # the negative control: the order changes what is sampled


def test_confidence_temperature_zero_keeps_the_most_confident_tokens_first():
    torch.manual_seed(0)
    model = MaskedTransformer(SPEC).eval()
    memory, mask = _memory(model)
    with torch.no_grad():
        all_masked = torch.full((2, 16), 16, dtype=torch.long)
        logp = torch.log_softmax(model(all_masked, memory, mask, model.memory_kv(memory)).float(), -1)
    top_logp = logp.max(-1).values  # temperature 0: each position's token is its argmax
    kept = 16 - masked_after_step(0, 4, 16)
    most_confident = [set(row.argsort(descending=True)[:kept].tolist()) for row in top_logp]

    def first_step(confidence_temperature: float, seed: int) -> list[set[int]]:
        cfg = SamplerConfig(steps=4, guidance_scale=0.0, temperature=0.0,
                            confidence_temperature=confidence_temperature)
        _, history = _decode_recorded(model, memory, mask, cfg, seed)
        return [set((row != 16).nonzero()[:, 0].tolist()) for row in history[1]]

    assert all(first_step(0.0, seed) == most_confident for seed in range(3))
    # the negative control: at the default temperature the first tokens kept are close to a random pick
    assert any(first_step(4.5, seed) != most_confident for seed in range(3))
