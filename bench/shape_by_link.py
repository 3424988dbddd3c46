"""Shape, colour and position of a store's samples over several sampling seeds, by link and by named shape.

    python bench/shape_by_link.py STORE [--seeds 6] [--captions 196] [--base VERSION] [--superres VERSION]
                                  [--base-sampler KNOB=VALUE ...] [--superres-sampler KNOB=VALUE ...]

For the first `--captions` held-out captions of the store's shards (the demo, or a folder source
whose json carries the demo's `objects`, e.g. `bench/shifted_demo.py`), samples the base and
super-res as generation does (the trained transformers' own sampler settings, no mid-layer
guidance, unless `--base-sampler` / `--superres-sampler` replace a `SamplerConfig` knob; batches of 16,
the seed of a batch 1000 * seed + its offset) and grades every named
object with the demo's pixel checker at two links: the base's grid through the low-res decoder
(upsampled to 128 px) and end to end. One `evaluate` report grades one sample of 128 captions, too
few to tell a two-point change; the mean over seeds and the per-shape counts are what compare.
For the shapes read wrong it also counts what the checker read them as (a bumpy square reads as
a circle, a lumpy circle as a diamond).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
from PIL import Image

from muse.artifacts.store import ArtifactStore
from muse.config import SamplerConfig
from muse.datasets.demo_check import MIN_AREA, classify_shape, colour_mask, grade
from muse.datasets.shards import read_samples
from muse.generate import TextToImage, to_images

BATCH = 16
LINKS = ("base link", "end to end")


def misread(image: Image.Image, obj: dict) -> str:
    """What the checker reads the object's colour mask as."""
    mask = colour_mask(np.asarray(image.convert("RGB")), obj["colour"])
    return classify_shape(mask) if mask.mean() >= MIN_AREA else "absent"


def sampler_knobs(pairs: list[str]) -> dict:
    """KNOB=VALUE pairs -> {knob: value}, numbers as numbers (pydantic checks the knobs)."""
    knobs = {}
    for pair in pairs:
        knob, _, value = pair.partition("=")
        try:
            knobs[knob] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            knobs[knob] = value
    return knobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--captions", type=int, default=196)
    parser.add_argument("--base", help="base version (default: the store's latest)")
    parser.add_argument("--superres", help="super-res version (default: the store's latest)")
    parser.add_argument("--base-sampler", nargs="*", default=[],
                        help="base sampler knobs, e.g. confidence_temperature=0.3")
    parser.add_argument("--superres-sampler", nargs="*", default=[], help="super-res sampler knobs, e.g. steps=16")
    args = parser.parse_args()
    store = ArtifactStore(args.store)
    pins = {"guide": None, "prior": None}
    if args.base:
        pins["base"] = store.get("base", args.base)
    if args.superres:
        pins["superres"] = store.get("superres", args.superres)
    pipe = TextToImage.from_store(store, pins=pins)
    sampling = pipe.resolve_sampling(guide_scale=0.0)
    passes = {name: SamplerConfig.model_validate(getattr(sampling, name).model_dump() | sampler_knobs(knobs))
              for name, knobs in (("base", args.base_sampler), ("superres", args.superres_sampler))}
    sampling = sampling.model_copy(update=passes)
    samples = [s for _, s in zip(range(args.captions), read_samples(store.get("shards").path, "val"))]
    objects = [s["info"]["source_info"]["objects"] for s in samples]
    print(f"{store.root}: base {pipe.lineage['base']}, super-res {pipe.lineage['superres']}; "
          f"samplers {sampling.base.model_dump()} / {sampling.superres.model_dump()}; "
          f"{len(samples)} val captions, {sum(map(len, objects))} objects, {args.seeds} seeds")

    start = time.perf_counter()
    shape = {link: [] for link in LINKS}  # % per seed
    colour = {link: [] for link in LINKS}
    position = {link: [] for link in LINKS}
    right = {link: Counter() for link in LINKS}  # shape right, by named shape, over all seeds
    read_as = {link: Counter() for link in LINKS}  # (named, read) for the shapes read wrong, over all seeds
    named = Counter()
    for seed in range(args.seeds):
        counts = {link: Counter() for link in LINKS}
        for i in range(0, len(samples), BATCH):
            captions = [s["caption"] for s in samples[i:i + BATCH]]
            tokens = pipe.generate_tokens(captions, sampling=sampling, seed=1000 * seed + i)
            images = {"base link": [im.resize((128, 128), Image.Resampling.BICUBIC) for im in
                                    to_images(pipe.decode_tokens({"tokens_low": tokens["tokens_low"]}))],
                      "end to end": to_images(pipe.decode_tokens(tokens))}
            for link, batch in images.items():
                for image, objs in zip(batch, objects[i:i + BATCH]):
                    for obj, result in zip(objs, grade(image, objs)):
                        counts[link].update(objects=1, **{k: int(v) for k, v in result.items()})
                        right[link][obj["shape"]] += result["shape"]
                        if result["colour"] and not result["shape"]:
                            read_as[link][obj["shape"], misread(image, obj)] += 1
                        named[obj["shape"]] += link == "base link"
        for link in LINKS:
            n = counts[link]["objects"]
            shape[link].append(100 * counts[link]["shape"] / n)
            colour[link].append(100 * counts[link]["colour"] / n)
            position[link].append(100 * counts[link]["position"] / n)
        print(f"seed {seed}: " + ", ".join(f"{link} shape {shape[link][-1]:.1f}" for link in LINKS), flush=True)

    for link in LINKS:
        by_shape = ", ".join(f"{s} {right[link][s]}/{named[s]} ({100 * right[link][s] / named[s]:.1f})"
                             for s in sorted(named))
        print(f"{link}: shape {np.mean(shape[link]):.1f} (seeds {' '.join(f'{v:.1f}' for v in shape[link])}), "
              f"colour {np.mean(colour[link]):.1f}, position {np.mean(position[link]):.1f}; by shape: {by_shape}")
        print(f"{link}: read wrong as: " + ", ".join(f"{asked} -> {read} {n}"
                                                     for (asked, read), n in sorted(read_as[link].items())))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
