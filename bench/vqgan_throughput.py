"""Benchmark: VQGAN train-step samples/s for the tiny and muse-256 tokenizers vs lucidrains' VQGanVAE.

    python bench/vqgan_throughput.py [--steps 5] [--presets tiny muse-256]
    PYTHONPATH=/path/with/muse_maskgit_pytorch python bench/vqgan_throughput.py   # adds the peer

Each row times full optimizer steps (forward, reconstruction + codebook loss,
backward, AdamW) of the preset's low-res tokenizer without LPIPS and GAN, and,
in the same run, `muse_maskgit_pytorch.VQGanVAE` with the same base width, number
of downsamplings, codebook size and code dim (its VGG/GAN off too), at the same
batch and resolution. On a GPU the step runs under bf16 autocast and the script
prints model FLOPs utilisation against the given peak. Install the peer apart
from the project (`pip install --no-deps --target DIR muse-maskgit-pytorch
ema-pytorch memory-efficient-attention-pytorch accelerate sentencepiece`).
"""

from __future__ import annotations

import argparse

import torch

from timing import seconds_per_call

from muse.config import VQLossConfig, load_config
from muse.models.vqgan import VQModel
from muse.stages.train_vqgan import ImageObjective


def ours(cfg, batch: int, steps: int, device, dtype) -> float:
    model = VQModel(cfg).to(device)
    objective = ImageObjective(model, VQLossConfig(disc_weight=0.0, l2_weight=1.0), None)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.rand(batch, 3, cfg.resolution, cfg.resolution, device=device) * 2 - 1

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = objective.losses(x, 0)["gen"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return seconds_per_call(step, steps, device)


def lucidrains(cfg, batch: int, steps: int, device, dtype) -> tuple[float, float] | None:
    """(seconds per step, training FLOPs per step) of the peer, or None when it is not installed."""
    try:
        from muse_maskgit_pytorch.vqgan_vae import VQGanVAE
    except ImportError:
        return None
    # Its VQ branch does not construct in 0.3.5 (a missing comma before **vq_kwargs), so the peer
    # quantizes with its LFQ at the same codebook size; the conv encoder/decoder dominate the step anyway.
    vae = VQGanVAE(dim=cfg.ch, layers=len(cfg.ch_mult) - 1, codebook_size=cfg.codebook_size,
                   lookup_free_quantization=True, use_vgg_and_gan=False).to(device)
    opt = torch.optim.AdamW(vae.parameters(), 1e-4)
    x = torch.rand(batch, 3, cfg.resolution, cfg.resolution, device=device)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        vae(x, return_loss=True)
    flops = 3.0 * counter.get_total_flops()

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = vae(x, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return seconds_per_call(step, steps, device), flops


def train_flops(cfg, batch: int) -> float:
    """Forward FLOPs of one batch through our model (conv/linear MACs x2), times 3 for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    model = VQModel(cfg)
    with FlopCounterMode(display=False) as counter:  # one sample on the host: FLOPs are linear in the batch
        model(torch.rand(1, 3, cfg.resolution, cfg.resolution))
    return 3.0 * counter.get_total_flops() * batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "muse-256"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=None, help="default: 8 (tiny) / 2 on CPU, 32 on GPU (muse-256)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak for MFU (H100 SXM: 989)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None  # never bf16 on CPU: ~100x slower there
    print(f"device {device}, precision {'bf16 autocast' if dtype else 'fp32'}, torch threads {torch.get_num_threads()}")
    for preset in args.presets:
        cfg = load_config(preset).train_vqgan.low
        batch = args.batch or (8 if preset == "tiny" else (32 if device.type == "cuda" else 2))
        t_ours = ours(cfg, batch, args.steps, device, dtype)
        peer = lucidrains(cfg, batch, args.steps, device, dtype)
        flops = train_flops(cfg, batch)
        line = (f"{preset:9s} {cfg.resolution}px f{cfg.downsample} ch{cfg.ch} batch {batch}: "
                f"ours {batch / t_ours:8.1f} samples/s ({flops / t_ours / 1e9:7.1f} GFLOP/s)")
        if device.type == "cuda":
            line += f" MFU {flops / t_ours / (args.peak_tflops * 1e12):.1%}"
        if peer is None:
            line += " | lucidrains VQGanVAE: not installed (see --help)"
        else:
            t_peer, peer_flops = peer
            line += (f" | lucidrains {batch / t_peer:8.1f} samples/s ({peer_flops / t_peer / 1e9:7.1f} GFLOP/s, "
                     f"{peer_flops / flops:.2f}x our FLOPs) | samples/s ratio {t_peer / t_ours:.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    main()
