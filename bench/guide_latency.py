"""Benchmark: what mid-layer guidance costs the sampler, at the tiny and muse-256 base widths.

    python bench/guide_latency.py [--sizes tiny muse-256] [--batches 1 8] [--repeats 3] [--scale 0.5]

The same random-weight base decodes the same grids from the same text embeddings with
classifier-free guidance at every step, once plain and once steered by a random-weight guide
head (`muse.guidance.steer`, caption target) on the middle block: the extra cost is one
forward and backward through the head per step, for both CFG branches. Latency is the median
of `--repeats` runs after a warm-up; the overhead is the ratio of the two, measured in one run.
"""

from __future__ import annotations

import argparse

import torch

from sampler_latency import CODEBOOK, GUIDANCE, SIZES, TEXT_DIM, _median_seconds, _text
from timing import device_and_autocast

from muse.config import SamplerConfig
from muse.guidance import steer
from muse.models.guide import GuideHead, GuideSpec
from muse.models.text import pooled_text
from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.sampling import decode


def latency(size, batch: int, repeats: int, device, dtype, scale: float) -> float:
    """Median seconds of one guided-every-step decode of `batch` grids, steered at `scale` (0: no hook)."""
    dim, depth, heads, side, steps = size
    torch.manual_seed(0)
    model = MaskedTransformer(TransformerSpec(dim=dim, depth=depth, heads=heads, codebook_size=CODEBOOK,
                                              side=side, text_dim=TEXT_DIM)).to(device).eval()
    head = GuideHead(GuideSpec(feature_dim=dim, block=depth // 2, target="caption", text_dim=TEXT_DIM)).to(device)
    emb, mask = _text(batch, device)
    condition = pooled_text(emb, mask)
    cfg = SamplerConfig(steps=steps, guidance_scale=GUIDANCE)

    @torch.no_grad()
    def run():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None), \
                steer(model, head.eval(), condition, scale):
            memory, memory_mask = model.memory(emb, mask)
            uncond, uncond_mask = model.memory(emb, torch.zeros_like(mask))
            decode(model, memory, memory_mask, uncond, uncond_mask, cfg, torch.Generator(device).manual_seed(0))

    return _median_seconds(run, repeats, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "muse-256"], choices=list(SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=float, default=0.5)
    args = p.parse_args()
    device, dtype = device_and_autocast()
    print(f"device {device}, precision {'bf16 autocast' if dtype else 'fp32'}, threads {torch.get_num_threads()}, "
          f"CFG {GUIDANCE} at every step, guide scale {args.scale}", flush=True)
    for name in args.sizes:
        size = SIZES[name]
        for batch in args.batches:
            plain = latency(size, batch, args.repeats, device, dtype, 0.0)
            guided = latency(size, batch, args.repeats, device, dtype, args.scale)
            print(f"{name:9s} dim {size[0]} depth {size[1]} {size[3]}x{size[3]} tokens {size[4]} steps batch {batch}: "
                  f"unguided {plain * 1e3:8.1f} ms | guided {guided * 1e3:8.1f} ms | overhead "
                  f"{(guided / plain - 1) * 100:+.1f}%", flush=True)


if __name__ == "__main__":
    main()
