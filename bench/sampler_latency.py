"""Benchmark: sampling latency and images/s of our MaskGIT sampler vs lucidrains' `MaskGit.generate`.

    python bench/sampler_latency.py [--sizes tiny ref] [--batches 1 8] [--repeats 3]
    PYTHONPATH=/path/with/muse_maskgit_pytorch python bench/sampler_latency.py   # adds the peer

Both sides decode a token grid from precomputed text embeddings with classifier-free
guidance at every step, the same number of steps, the same model dims and sequence: ours
with `muse.sampling.decode` (conditional and unconditional rows in one forward, memory K/V
cached), the peer with `MaskGit.generate` (its text encoder replaced by the same fixed
embeddings; no VAE, so both stop at token ids). Latency is the median of `--repeats` runs
after a warm-up. On a GPU the transformers run in bf16 and the default sizes add the muse-256
base width, to read beside the Muse paper's table 3 (Muse-3B on TPUv4: 0.5 s for a 256 px
image, 1.3 s at 512 px); no GPU was lent while this was written, so no such figure is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import types

import torch

from timing import device_and_autocast

from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.config import SamplerConfig
from muse.sampling import decode

# name: (dim, depth, heads, token side, steps)
SIZES = {
    "tiny": (128, 3, 4, 8, 12),        # the tiny preset's base model and evaluate steps
    "ref": (256, 4, 4, 8, 24),         # the transformer bench's reference width, paper step count
    "muse-256": (1024, 24, 16, 16, 24),  # muse-256 base width at 16x16 tokens (GPU)
}
CODEBOOK, TEXT_LEN, TEXT_DIM, GUIDANCE = 1024, 32, 384, 3.0


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _text(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(TEXT_LEN)[None] < torch.randint(4, TEXT_LEN + 1, (batch, 1), generator=g)
    emb = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g) * mask[..., None]
    return emb.to(device), mask.to(device)


def ours(size, batch: int, repeats: int, device, dtype) -> float:
    dim, depth, heads, side, steps = size
    model = MaskedTransformer(TransformerSpec(dim=dim, depth=depth, heads=heads, codebook_size=CODEBOOK,
                                              side=side, text_dim=TEXT_DIM)).to(device).eval()
    emb, mask = _text(batch, device)
    cfg = SamplerConfig(steps=steps, guidance_scale=GUIDANCE)

    @torch.no_grad()
    def run():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            memory, memory_mask = model.memory(emb, mask)
            uncond, uncond_mask = model.memory(emb, torch.zeros_like(mask))
            decode(model, memory, memory_mask, uncond, uncond_mask, cfg, torch.Generator(device).manual_seed(0))

    return _median_seconds(run, repeats, device)


def lucidrains(size, batch: int, repeats: int, device, dtype) -> float | None:
    try:
        import muse_maskgit_pytorch.t5 as t5

        t5.T5_CONFIGS[t5.DEFAULT_T5_NAME] = {"config": types.SimpleNamespace(d_model=TEXT_DIM)}
        from muse_maskgit_pytorch import MaskGit, MaskGitTransformer, VQGanVAE
    except ImportError:
        return None
    dim, depth, heads, side, steps = size
    transformer = MaskGitTransformer(num_tokens=CODEBOOK, seq_len=side * side, dim=dim, depth=depth, heads=heads,
                                     dim_head=dim // heads, ff_mult=4)
    # MaskGit insists on a VAE with the same codebook size; its decode is skipped so both sides stop at token ids
    vae = VQGanVAE(dim=16, layers=1, codebook_size=CODEBOOK, lookup_free_quantization=True, use_vgg_and_gan=False)
    maskgit = MaskGit(image_size=side, transformer=transformer, vae=vae).to(device).eval()
    maskgit.vae.decode_from_ids = lambda ids: ids
    emb, _ = _text(batch, device)
    transformer.encode_text = lambda texts: emb[: len(texts)]  # the same embeddings; no T5
    texts = ["prompt"] * batch

    @torch.no_grad()
    def run():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None), \
                contextlib.redirect_stderr(io.StringIO()):  # its per-call tqdm bar
            maskgit.generate(texts, fmap_size=side, timesteps=steps, cond_scale=GUIDANCE)

    return _median_seconds(run, repeats, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES),
                   help="default: tiny ref (CPU), tiny ref muse-256 (GPU)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device, dtype = device_and_autocast()
    sizes = args.sizes or (["tiny", "ref", "muse-256"] if device.type == "cuda" else ["tiny", "ref"])
    print(f"device {device}, precision {'bf16 autocast' if dtype else 'fp32'}, threads {torch.get_num_threads()}, "
          f"guidance {GUIDANCE} at every step", flush=True)
    for name in sizes:
        size = SIZES[name]
        for batch in args.batches:
            t_ours = ours(size, batch, args.repeats, device, dtype)
            print(f"{name:9s} dim {size[0]} depth {size[1]} {size[3]}x{size[3]} tokens {size[4]} steps batch {batch}: "
                  f"ours {t_ours * 1e3:8.1f} ms ({batch / t_ours:7.1f} images/s)", end="", flush=True)
            try:
                t_peer = lucidrains(size, batch, args.repeats, device, dtype)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. its masked fill overflows in bf16
                print(f" | lucidrains failed: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            if t_peer is None:
                print(" | lucidrains MaskGit.generate: not installed (see --help)", flush=True)
            else:
                print(f" | lucidrains {t_peer * 1e3:8.1f} ms ({batch / t_peer:7.1f} images/s) | speed-up "
                      f"{t_peer / t_ours:.2f}x", flush=True)

if __name__ == "__main__":
    main()
