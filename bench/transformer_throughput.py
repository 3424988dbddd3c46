"""Benchmark: masked-transformer train-step tokens/s vs lucidrains' MaskGitTransformer and the matmul peak.

    python bench/transformer_throughput.py [--steps 10] [--sizes tiny ref]
    PYTHONPATH=/path/with/muse_maskgit_pytorch python bench/transformer_throughput.py   # adds the peer

A row times full optimizer steps (forward with the text memory, masked-token cross-entropy
at an arccos-sampled mask rate, backward, AdamW) of our base transformer and, in the same
run, `muse_maskgit_pytorch.MaskGitTransformer` at the same width, depth, heads, MLP ratio,
sequence and text length, with the same precomputed text embeddings passed in. It prints
tokens/s, achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode on each model), the
ratio to the peer, and the fraction of this machine's matmul peak, which the script measures
itself (fp32 sgemm on CPU, bf16 on GPU). On a GPU the step runs under bf16 autocast and the
peak is the measured bf16 matmul rate; `--peak-tflops` prints MFU against a datasheet figure too.
Install the peer apart from the project (`pip install --no-deps --target DIR muse-maskgit-pytorch
ema-pytorch memory-efficient-attention-pytorch accelerate beartype einops`); its T5 is never loaded:
the text embeddings are given.
"""

from __future__ import annotations

import argparse
import types

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timing import device_and_autocast, seconds_per_call

from muse.masking import sample_mask_rate
from muse.models.transformer import MaskedTransformer, TransformerSpec
from muse.transformer_training import MaskedLM

# name: (dim, depth, heads, token side, batch on CPU, batch on GPU)
SIZES = {
    "tiny": (128, 3, 4, 8, 32, 256),       # the tiny preset's base model
    "ref": (256, 4, 4, 8, 32, 256),        # the reference point for the peer
    "muse-256": (1024, 24, 16, 16, 4, 64),  # the muse-256 base width at 16x16 tokens
}
CODEBOOK, TEXT_LEN, TEXT_DIM = 1024, 32, 384


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: what the hardware gives a well-shaped GEMM here."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / seconds_per_call(lambda: a @ b, 5, device)


def _batch(batch: int, seq: int, device: torch.device, generator: torch.Generator):
    """Targets, the mask (arccos rate per sample) and text embeddings with some padding."""
    tokens = torch.randint(0, CODEBOOK, (batch, seq), generator=generator)
    rate = sample_mask_rate(batch, generator)
    masked = torch.rand(batch, seq, generator=generator) < rate[:, None]
    masked[:, 0] = True
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=generator)
    text_mask = torch.arange(TEXT_LEN)[None] < torch.randint(4, TEXT_LEN + 1, (batch, 1), generator=generator)
    return [t.to(device) for t in (tokens, masked, text * text_mask[..., None], text_mask)]


def _train_step(loss_fn, params, dtype, device):
    opt = torch.optim.AdamW(params, 1e-4, fused=device.type == "cuda")  # as muse.training does

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _flops(loss_fn) -> float:
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return float(counter.get_total_flops())


def ours(size, batch, steps, device, dtype, compile_mode=None):
    dim, depth, heads, side, *_ = size
    model = MaskedTransformer(TransformerSpec(dim=dim, depth=depth, heads=heads, codebook_size=CODEBOOK,
                                              side=side, text_dim=TEXT_DIM)).to(device)
    lm = MaskedLM(model)
    tokens, masked, text, text_mask = _batch(batch, side * side, device, torch.Generator().manual_seed(0))
    inputs = tokens.masked_fill(masked, model.spec.mask_id)

    def loss_fn(module=lm, rows=batch):  # as MaskedObjective: weighted by the mask, no indexing that waits
        logits = module(inputs[:rows], text[:rows], text_mask[:rows], None, None)
        per_token = F.cross_entropy(logits.transpose(1, 2), tokens[:rows], reduction="none")
        return (per_token * masked[:rows]).sum() / masked[:rows].sum()

    # counted eagerly (compiling fuses kernels, not matmuls away) on a slice of the batch, since FLOPs grow
    # linearly with it and an eager pass at the batch a compiled step fits in would run out of memory
    part = min(batch, 8)
    flops = _flops(lambda: loss_fn(lm, part)) * batch / part
    compiled = torch.compile(lm, mode=compile_mode) if compile_mode else lm
    step = _train_step(lambda: loss_fn(compiled), model.parameters(), dtype, device)
    if compile_mode:
        step()  # compilation stays out of the timing
    return seconds_per_call(step, steps, device), flops


def lucidrains(size, batch, steps, device, dtype):
    """(seconds per step, FLOPs per step) of the peer, or None when it is not installed."""
    try:
        import muse_maskgit_pytorch.t5 as t5

        # its constructor asks T5's config for the text width; answer it without the hub
        t5.T5_CONFIGS[t5.DEFAULT_T5_NAME] = {"config": types.SimpleNamespace(d_model=TEXT_DIM)}
        from muse_maskgit_pytorch import MaskGitTransformer
    except ImportError:
        return None
    dim, depth, heads, side, *_ = size
    model = MaskGitTransformer(num_tokens=CODEBOOK, seq_len=side * side, dim=dim, depth=depth, heads=heads,
                               dim_head=dim // heads, ff_mult=4).to(device)
    tokens, masked, text, _ = _batch(batch, side * side, device, torch.Generator().manual_seed(0))
    inputs = tokens.masked_fill(masked, model.mask_id)
    labels = tokens.masked_fill(~masked, -1)

    def loss_fn():
        return model(inputs, labels=labels, ignore_index=-1, text_embeds=text)

    flops = _flops(loss_fn)
    return seconds_per_call(_train_step(loss_fn, model.parameters(), dtype, device), steps, device), flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES),
                   help="default: tiny ref (CPU; a muse-256 step takes ~30 s here), tiny ref muse-256 (GPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="default: per size, larger on GPU")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile our model in this mode (the peer stays eager)")
    p.add_argument("--peak-tflops", type=float, default=None, help="datasheet bf16 dense peak for MFU (H100 SXM: 989)")
    args = p.parse_args()
    device, dtype = device_and_autocast()
    peak = matmul_peak(device, dtype or torch.float32)
    print(f"device {device}, precision {'bf16 autocast' if dtype else 'fp32'}, threads {torch.get_num_threads()}, "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    for name in args.sizes or (["tiny", "ref", "muse-256"] if device.type == "cuda" else ["tiny", "ref"]):
        size = SIZES[name]
        batch = args.batch or (size[5] if device.type == "cuda" else size[4])
        seq = size[3] ** 2
        t_ours, f_ours = ours(size, batch, args.steps, device, dtype, args.compile)
        label = f"{name} compiled ({args.compile})" if args.compile else name
        line = (f"{label:9s} dim {size[0]} depth {size[1]} seq {seq} "
                f"batch {batch}: ours {batch * seq / t_ours:9.0f} tokens/s {f_ours / t_ours / 1e9:8.1f} GFLOP/s "
                f"= {f_ours / t_ours / peak:5.1%} of peak")
        if args.peak_tflops:
            line += f" (MFU {f_ours / t_ours / (args.peak_tflops * 1e12):.1%})"
        if device.type == "cuda":  # the compiled step at a given batch needs less than the eager one
            line += f" peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            torch.cuda.reset_peak_memory_stats()
        print(line, end="", flush=True)  # our figure stands even when the peer fails
        try:
            peer = lucidrains(size, batch, args.steps, device, dtype)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. its masked fill overflows in bf16
            print(f" | lucidrains failed: {str(e).splitlines()[0][:120]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if peer is None:
            print(" | lucidrains MaskGitTransformer: not installed (see --help)", flush=True)
        else:
            t_peer, f_peer = peer
            print(f" | lucidrains {batch * seq / t_peer:9.0f} tokens/s {f_peer / t_peer / 1e9:8.1f} GFLOP/s "
                  f"({f_peer / f_ours:.2f}x our FLOPs) | tokens/s ratio {t_peer / t_ours:.2f}x", flush=True)

if __name__ == "__main__":
    main()
