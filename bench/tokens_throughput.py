"""Benchmark: tokenize images/s and peak RSS at two dataset sizes; token reader samples/s.

    python bench/tokens_throughput.py [--sizes 1000 4000] [--preset tiny]

For each size, in a fresh subprocess (peak RSS is per process): shard N demo samples,
save randomly initialised tokenizers of the preset, and encode every shard with the
stage's own `ShardEncoder` (no Ray: the per-actor cost is what scales out). Prints
images/s and peak RSS; the goal is an RSS that does not grow with N. Then streams
the larger dataset through `TokenTable.stream` + `collate` and prints samples/s beside
the tiny trainers' consumption (batch x steps/s, passed with --consumed); goal >= 10x.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from muse.artifacts.store import ArtifactStore
from muse.config import load_config
from muse.datasets.labels import build_label_space
from muse.datasets.shards import SPLITS, shard_files
from muse.datasets.tokens import TokenTable, collate
from muse.models.vqgan import VQModel, save_pretrained
from muse.stage import execute
from muse.stages import shard, tokenize


def encode(n: int, preset: str, root: Path) -> dict:
    cfg = load_config(preset, overrides=[f"demo.num_samples={n}", "shard.samples_per_shard=500"])
    store = ArtifactStore(root / "store")
    shards = execute(shard, cfg, {}, store)
    space = build_label_space(cfg.segment.dataset_classes)
    models = {}
    for name, mcfg, channels in (("low", cfg.train_vqgan.low, 3), ("high", cfg.train_vqgan.high, 3),
                                 ("seg", cfg.train_vqgan.seg, space.size + 1)):
        models[name] = str(root / name)
        save_pretrained(VQModel(mcfg, channels, channels), root / name, channels, channels)
    geometry = {col: {"side": m.token_side, "codebook_size": m.codebook_size}
                for col, m in zip(tokenize.TOKEN_COLUMNS, (cfg.train_vqgan.low, cfg.train_vqgan.high,
                                                             cfg.train_vqgan.seg))}
    encoder = _encoder(models, cfg, space.size, root / "tokens", geometry)
    start, rows = time.perf_counter(), 0
    for split in SPLITS:
        for path in shard_files(shards.path, split):
            rows += encoder.encode_shard(path, None, split)["rows"]
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (root / "tokens" / "_schema.json").write_text(json.dumps({"geometry": geometry, "text": encoder.text_info}))
    table, batch = TokenTable(root / "tokens", "train"), 32
    stream = table.stream(seed=0)
    start, read = time.perf_counter(), 0
    while time.perf_counter() - start < 5:
        collate([next(stream) for _ in range(batch)])
        read += batch
    return {"n": rows, "images_per_s": rows / seconds, "peak_rss_mib": rss,
            "reader_samples_per_s": read / (time.perf_counter() - start)}


def _encoder(models, cfg, num_labels, out_dir: Path, geometry):
    from muse.models.text import load_text_encoder

    probe = load_text_encoder(cfg.tokenize.text_encoder)
    text = {"dim": probe.dim, "max_length": probe.max_length}
    enc = tokenize.ShardEncoder(models, cfg.tokenize, num_labels, str(out_dir), geometry, text, "cpu")
    enc.text_info = text
    return enc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--consumed", type=float, default=0.0, help="samples/s a trainer consumes, for the ratio")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(encode(args.one, args.preset, Path(tmp))))
        return
    results = []
    for n in args.sizes:
        keep = Path(tempfile.mkdtemp())
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--preset", args.preset],
                             capture_output=True, text=True, check=True, cwd=keep)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"tokenize {r['n']:6d} samples: {r['images_per_s']:7.1f} images/s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"reader {r['reader_samples_per_s']:.0f} samples/s (batches of 32 with text embeddings)")
        if args.consumed:
            print(f"  reader / trainer consumption: {r['reader_samples_per_s'] / args.consumed:.1f}x (goal >= 10x)")
    print(f"RSS ratio largest/smallest: {results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f} (goal ~1.0)")


if __name__ == "__main__":
    main()
