"""Benchmark: images/s of the shard stage vs img2dataset on the same local JPEGs.

    python bench/shard_throughput.py [--n 2000] [--size 512] [--resolution 256]

Generates N 512px JPEGs once (cached in /tmp), shards them with 1 and 2 workers of the
process pool and of Ray Data (`shard.engine: ray`, a local Ray of 1 and 2 CPUs), then runs img2dataset (its CLI, on PATH or --img2dataset; install it in its own
environment: it pins webdataset<0.3) on the same files given as file:// URLs with
the same output size. Prints images/s and the per-core ratio. Goal: >= 1.0x.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from muse.artifacts.store import ArtifactStore
from muse.config import load_config
from muse.stage import execute
from muse.stages import shard


def make_images(root: Path, n: int, size: int) -> Path:
    folder = root / f"jpegs-{n}-{size}"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        # Smooth random content (upsampled noise): realistic JPEG sizes and decode cost, every image unique.
        noise = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(noise).resize((size + (i % 7) * 16, size), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"benchmark image number {i}")
    return folder


def bench_shard(folder: Path, workers: int, resolution: int, n: int, engine: str = "processes") -> float:
    """Images/s of the shard stage; with engine ray, on a local Ray of `workers` CPUs started for the run
    (its start-up is not counted: a cluster is up before a run)."""
    if engine == "ray":
        import ray

        ray.shutdown()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("tiny", overrides=[
            f"shard.source={folder}", f"shard.workers={workers}", "shard.image_format=jpg", f"shard.engine={engine}",
            f"train_vqgan.low.resolution={resolution}", f"train_vqgan.high.resolution={resolution}",
        ])
        t = time.perf_counter()
        art = execute(shard, cfg, {}, ArtifactStore(tmp))
        elapsed = time.perf_counter() - t
        assert art.manifest.metrics["written"] == n, art.manifest.metrics
    return n / elapsed


def bench_img2dataset(binary: str, folder: Path, workers: int, resolution: int, n: int) -> float | None:
    if shutil.which(binary) is None:
        print(f"img2dataset: '{binary}' not found; pip install img2dataset (own venv) and pass --img2dataset")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        urls = Path(tmp) / "urls.txt"
        urls.write_text("\n".join(f"file://{p}" for p in sorted(folder.glob("*.jpg"))))
        cmd = [binary, f"--url_list={urls}", f"--output_folder={tmp}/out", "--output_format=webdataset",
               f"--image_size={resolution}", "--resize_mode=center_crop", f"--processes_count={workers}",
               "--thread_count=4", "--disable_all_reencoding=False", "--enable_wandb=False"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--img2dataset", default="img2dataset")
    args = p.parse_args()
    folder = make_images(Path(tempfile.gettempdir()) / "muse-bench", args.n, args.size)
    print(f"{args.n} JPEGs of {args.size}px in {folder}; output {args.resolution}px JPEG")
    for workers in (1, 2):
        ours = bench_shard(folder, workers, args.resolution, args.n)
        on_ray = bench_shard(folder, workers, args.resolution, args.n, "ray")
        theirs = bench_img2dataset(args.img2dataset, folder, workers, args.resolution, args.n)
        line = (f"workers={workers}: muse shard {ours:7.1f} img/s ({ours / workers:6.1f}/core) | on Ray "
                f"{on_ray:7.1f} img/s ({on_ray / ours:.2f}x the pool)")
        if theirs:
            line += f" | img2dataset {theirs:7.1f} img/s ({theirs / workers:6.1f}/core) | ratio {ours / theirs:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
