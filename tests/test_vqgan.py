"""VQGAN model, losses and the train-vqgan stage on demo data."""

import numpy as np
import pytest
import torch

from muse.config import VQLossConfig, VQModelConfig, load_config
from muse.datasets.demo import make_sample
from muse.models.image_loss import psnr
from muse.models.vqgan import (
    VQModel,
    adaptive_weight,
    from_pretrained,
    hinge_d_loss,
    save_pretrained,
)
from muse.stage import execute
from muse.stages import segment, shard, train_vqgan
from muse.training import TrainLoop, seed_everything


def _cfg(**kw):
    base = dict(resolution=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=16, codebook_size=64, code_dim=8)
    return VQModelConfig(**{**base, **kw})


FSQ = dict(quantizer="fsq", fsq_levels=(4, 4, 3), codebook_size=48)


@pytest.mark.parametrize("arch", ["taming", "vqvae"])
@pytest.mark.parametrize("mult, factor", [((1, 2, 2, 2), 8), ((1, 1, 2, 2, 4), 16)])
@pytest.mark.parametrize("quantizer", [{}, FSQ], ids=["vq", "fsq"])
def test_shapes_for_f8_and_f16_and_codes_in_range(mult, factor, arch, quantizer):
    attn = (64 // factor,) if arch == "taming" else ()
    cfg = _cfg(resolution=64, ch=8, ch_mult=mult, attn_resolutions=attn, arch=arch, **quantizer)
    assert cfg.downsample == factor and cfg.token_side == 64 // factor
    model = VQModel(cfg)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, codes, loss = model(x)
    assert recon.shape == x.shape and codes.shape == (2, 64 // factor, 64 // factor)
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < cfg.codebook_size
    assert loss.ndim == 0 and torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        quantized, codes, _ = model.encode(x)
        assert torch.allclose(model.codes_to_latents(codes), quantized, atol=1e-5)  # decode_codes == decode(encode)


def test_seg_geometry_is_validated():
    with pytest.raises(ValueError, match="not divisible"):
        _cfg(resolution=34)
    with pytest.raises(ValueError, match="must be EMA-updated"):
        _cfg(use_cosine_sim=True, ema_update=False)
    with pytest.raises(ValueError, match="arch vqvae needs"):
        _cfg(arch="vqvae", attn_resolutions=(8,))
    with pytest.raises(ValueError, match=r"codebook_size 64 must be the product of fsq_levels \[4, 4, 3\] = 48"):
        _cfg(quantizer="fsq", fsq_levels=(4, 4, 3))
    with pytest.raises(ValueError, match="each of 2\\+ levels"):
        _cfg(quantizer="fsq", fsq_levels=(64, 1), codebook_size=64)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    last = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    out = x @ last
    rec = out.pow(2).mean()
    g = -(out * 3).mean()
    rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    assert torch.allclose(adaptive_weight(rec, g, last), expected)
    assert hinge_d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0)) == 0  # both sides past their margin
    assert torch.isclose(hinge_d_loss(torch.zeros(3), torch.zeros(3)), torch.tensor(1.0))


def _demo_batch(n=32, size=32):
    imgs = [np.asarray(make_sample(i, size, seed=0).image) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@pytest.mark.parametrize("quantizer", [dict(codebook_size=128), dict(FSQ, fsq_levels=(8, 5, 5, 5), codebook_size=1000)],
                         ids=["vq", "fsq"])
def test_tiny_vqgan_overfits_32_demo_images(tmp_path, quantizer):
    """32 px demo images, 500 steps: PSNR on the same images rises from ~9 dB to above 22 dB (26 at 600)."""
    seed_everything(0)
    data = _demo_batch()
    model = VQModel(_cfg(**quantizer))
    objective = train_vqgan.ImageObjective(model, VQLossConfig(disc_weight=0.0, l2_weight=1.0), None)
    cfg = load_config("tiny").train_vqgan.train.model_copy(
        update={"steps": 500, "batch_size": 16, "lr": 2e-3, "warmup_steps": 10, "log_every": 100,
                "checkpoint_every": 1000, "schedule": "constant"})

    def stream(position):
        g = torch.Generator().manual_seed(position)
        while True:
            yield data[torch.randperm(32, generator=g)[:16]]

    with torch.no_grad():
        before = float(psnr(data, model.eval()(data)[0].clamp(-1, 1)))
    TrainLoop(cfg, objective, tmp_path / "work", "overfit").run(stream)
    with torch.no_grad():
        after = float(psnr(data, model.eval()(data)[0].clamp(-1, 1)))
    assert before < 14 and after > 22, (before, after)


@pytest.mark.parametrize("quantizer", [{}, FSQ], ids=["vq", "fsq"])
def test_save_and_load_round_trip(tmp_path, quantizer):
    model = VQModel(_cfg(**quantizer)).eval()
    save_pretrained(model, tmp_path / "m", 3, 3, {"input": "rgb"})
    loaded = from_pretrained(tmp_path / "m")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, ca, _ = model(x)
        b, cb, _ = loaded(x)
    assert torch.equal(ca, cb) and torch.allclose(a, b)


def test_lpips_loads_vgg_weights_from_a_path(tmp_path):
    import torchvision

    from muse.models.perceptual import load_lpips

    torch.save(torchvision.models.vgg16().state_dict(), tmp_path / "vgg16.pth")
    lp = load_lpips(tmp_path / "vgg16.pth")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(lp(x, x).mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(lp(x, -x).mean()) > 0
    with pytest.raises(FileNotFoundError, match="train_vqgan.loss.vgg_weights"):
        load_lpips(tmp_path / "missing.pth")


def test_stage_trains_all_three_tokenizers(ray_local, store, small_config):
    cfg = small_config(
        "segment.dataset_classes=[circle, square, triangle, diamond]",
        "train_vqgan.train.steps=6", "train_vqgan.train.log_every=3",
        "train_vqgan.train.checkpoint_every=3", "train_vqgan.loss.disc_weight=0.1", "train_vqgan.loss.disc_start=3",
    )
    shards = execute(shard, cfg, {}, store)
    segments = execute(segment, cfg, {"shards": shards}, store)
    arts = {a.kind: a for a in execute(train_vqgan, cfg, {"shards": shards, "segments": segments}, store)}
    assert set(arts) == {"vqgan-low", "vqgan-high", "vqseg"}
    assert len({a.version for a in arts.values()}) == 3  # each tokenizer versioned on what it reads
    assert arts["vqgan-low"].manifest.inputs == {"shards": shards.version}
    assert arts["vqseg"].manifest.inputs == {"segments": segments.version}
    for kind, a in arts.items():
        m = a.manifest.metrics
        assert m["steps"] == 6 and m["val_samples"] > 0 and 0 < m["codebook_usage"] <= 1 and m["perplexity"] >= 1
        assert (a.path / "previews" / "reconstructions.png").is_file()
        assert any((a.path / "tensorboard").iterdir())
        model = from_pretrained(a.path)
        assert model.cfg.token_side == (8 if kind == "vqseg" else 4)
    assert "psnr" in arts["vqgan-low"].manifest.metrics and "pixel_accuracy" in arts["vqseg"].manifest.metrics
    # whether LPIPS trained the image tokenizers is said in their manifests (no VGG weights here)
    assert arts["vqgan-low"].manifest.details["lpips"] == "off: no loss.vgg_weights (LPIPS weights path)"
    assert "lpips" not in arts["vqseg"].manifest.details
    assert "train_d_weight" in arts["vqgan-high"].manifest.metrics  # the GAN switched on at disc_start
    # A rerun finds every tokenizer committed and trains nothing.
    again = execute(train_vqgan, cfg, {"shards": shards, "segments": segments}, store)
    assert {a.manifest.seq for a in again} == {1}


@pytest.mark.parametrize("arch, width_mult", [("taming", 1.0), ("vqvae", 1.5)])
def test_a_deeper_decoder_starts_as_the_trained_one(arch, width_mult):
    from muse.models.vqgan import LatentDecoder, init_from

    cfg = VQModelConfig(resolution=32, ch=16, ch_mult=[1, 2, 2, 4], num_res_blocks=1, embed_dim=32,
                        codebook_size=64, code_dim=8, arch=arch)
    torch.manual_seed(0)
    old = VQModel(cfg).eval()
    # without GroupNorm, wider layers also start exact: new channels feed old ones through zeroed weights
    new = LatentDecoder(cfg, 3, extra_res_blocks=2, width_mult=width_mult).eval()
    assert init_from(new, old) > 5
    z = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        assert torch.equal(new(z), old.decode(z))  # extra ResBlocks start as the identity
    assert sum(p.numel() for p in new.parameters()) > sum(p.numel() for p in old.decoder.parameters())
