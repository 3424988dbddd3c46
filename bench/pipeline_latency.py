"""Benchmark: text-embeddings-to-pixels latency of a preset's whole sampling pipeline (random weights).

    python bench/pipeline_latency.py [--presets tiny] [--batches 1 8] [--repeats 3]
    python bench/pipeline_latency.py                      # on a GPU: muse-256 and muse-512, bf16

Builds a preset's models at their configured sizes with random weights (the latency does not
depend on them) and times what `muse generate` does after the text encoder: the base
transformer's guided decode of the low-res grid, then (with `--superres`, the default for
muse-512) the super-res transformer's decode of the high-res grid conditioned on it, then the
VQGAN decode to pixels (the finetuned decoder at the high resolution). Text embeddings are
random at the preset's encoder width and length, since T5-XXL itself cannot be loaded offline;
its forward is a small share of the total on a GPU. Steps and guidance come from the preset's
`evaluate` section. Printed beside the Muse paper's table 3 (Muse-3B on TPUv4: 0.5 s for a
256 px image, 1.3 s at 512 px); our muse presets are paper-like in width but far smaller than 3B.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from timing import device_and_autocast

from muse.config import PipelineConfig, load_config
from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.models.vqgan import LatentDecoder, VQModel
from muse.sampling import decode

# hidden size of the text encoders the presets name (the embeddings are random here)
TEXT_WIDTH = {"minilm": 384, "google/t5-v1_1-xxl": 4096, "google/t5-v1_1-xl": 2048,
              "google/t5-v1_1-large": 1024, "google/t5-v1_1-base": 768}
PAPER_SECONDS = {256: 0.5, 512: 1.3}  # Muse-3B, TPUv4, Muse paper table 3


def text_width(cfg: PipelineConfig) -> int:
    enc = cfg.tokenize.text_encoder
    key = "minilm" if enc.kind == "minilm" else enc.model
    if key not in TEXT_WIDTH:
        raise SystemExit(f"bench/pipeline_latency.py: unknown width of text encoder {key!r}; add it to TEXT_WIDTH")
    return TEXT_WIDTH[key]


def build(cfg: PipelineConfig, superres: bool, device: torch.device):
    """(base, super-res or None, pixel decoder: codes -> images, output side) at the preset's sizes."""
    low, high, width = cfg.train_vqgan.low, cfg.train_vqgan.high, text_width(cfg)

    def transformer(model_cfg, target, cond=None):
        return MaskedTransformer(TransformerSpec(
            dim=model_cfg.dim, depth=model_cfg.depth, heads=model_cfg.heads, codebook_size=target.codebook_size,
            side=target.token_side, text_dim=width, cond_codebook_size=cond.codebook_size if cond else 0,
            cond_side=cond.token_side if cond else 0, cond_depth=model_cfg.cond_depth,
            cond_aligned=bool(cond) and model_cfg.cond_aligned)).to(device).eval()

    base = transformer(cfg.train_base.model, low)
    if not superres:
        vq = VQModel(low).to(device).eval()
        return base, None, lambda codes: vq.decode_codes(codes), low.resolution
    sr = transformer(cfg.train_superres.model, high, low)
    vq = VQModel(high).to(device).eval()
    ft = cfg.finetune_decoder
    dec = LatentDecoder(high, extra_res_blocks=ft.extra_res_blocks, width_mult=ft.channel_mult).to(device).eval()
    return base, sr, lambda codes: dec(vq.codes_to_latents(codes)), high.resolution


def time_pipeline(cfg: PipelineConfig, superres: bool, batch: int, repeats: int, device, dtype):
    """Median seconds of (base decode, super-res decode, pixel decode) and the output side."""
    base, sr, to_pixels, side = build(cfg, superres, device)
    length, width = cfg.tokenize.text_encoder.max_length, text_width(cfg)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, length, width, generator=g).to(device)
    mask = (torch.arange(length)[None] < torch.randint(4, length + 1, (batch, 1), generator=g)).to(device)
    base_cfg, sr_cfg = cfg.sampling.base, cfg.sampling.superres

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def run() -> list[float]:
        marks = [time.perf_counter()]
        gen = torch.Generator(device).manual_seed(0)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            memory, m_mask = base.memory(emb, mask)
            u_memory, u_mask = base.memory(emb, torch.zeros_like(mask))
            codes = decode(base, memory, m_mask, u_memory, u_mask, base_cfg, gen)
            sync()
            marks.append(time.perf_counter())
            model = base
            if sr is not None:
                memory, m_mask = sr.memory(emb, mask, codes)
                u_memory, u_mask = sr.memory(emb, torch.zeros_like(mask), codes)
                codes = decode(sr, memory, m_mask, u_memory, u_mask, sr_cfg, gen)
                model = sr
            sync()
            marks.append(time.perf_counter())
            s = model.spec.side
            images = to_pixels(codes.view(-1, s, s))
            sync()
            marks.append(time.perf_counter())
        assert images.shape[-1] == side
        return [b - a for a, b in zip(marks, marks[1:])]

    run()  # warm-up: allocations, kernel choice
    parts = [run() for _ in range(repeats)]
    totals = [sum(p) for p in parts]
    median = parts[totals.index(statistics.median_low(totals))]
    return median, side


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None,
                   help="default: tiny (CPU), muse-256 muse-512 (GPU); muse-512 adds the super-res pass")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device, dtype = device_and_autocast()
    presets = args.presets or (["muse-256", "muse-512"] if device.type == "cuda" else ["tiny"])
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, precision "
          f"{'bf16 autocast' if dtype else 'fp32'}, threads {torch.get_num_threads()}, random weights, "
          f"text encoder not timed", flush=True)
    for preset in presets:
        cfg = load_config(preset)
        superres = preset != "muse-256"  # muse-256 stops at the base; the others go to the high resolution
        sampling = cfg.sampling
        for batch in args.batches:
            (t_base, t_sr, t_pixels), side = time_pipeline(cfg, superres, batch, args.repeats, device, dtype)
            total = t_base + t_sr + t_pixels
            line = (f"{preset:9s} {side} px batch {batch}: {total * 1e3:8.1f} ms = base {sampling.base.steps} steps "
                    f"{t_base * 1e3:.1f} + super-res {sampling.superres.steps if superres else 0} steps {t_sr * 1e3:.1f} "
                    f"+ pixels {t_pixels * 1e3:.1f} ms; {batch / total:.2f} images/s")
            if side in PAPER_SECONDS:
                line += f" | paper (Muse-3B, TPUv4) {PAPER_SECONDS[side]} s per image"
            print(line, flush=True)


if __name__ == "__main__":
    main()
