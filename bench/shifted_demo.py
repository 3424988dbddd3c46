"""A data set of the demo's kind that the tiny preset was never tuned on: a check of how shape holds off the demo.

    python bench/shifted_demo.py OUT_DIR [--num-samples 2000] [--seed 77]
    muse run full-train --store STORE --source OUT_DIR
    python bench/shape_by_link.py STORE

Three shapes (no diamond), object sizes from 0.10 to 0.26 of the side where the demo has 0.14 to
0.22, centres at 0.28 / 0.72 of the side with twice the demo's jitter, 30% two-object images,
other wording for every position and other caption templates, the demo's colour names and
backgrounds, COCO-panoptic masks. Written as a folder source (KEY.png, .txt, .json,
.panoptic.png) whose json carries the objects, so the demo's pixel checker grades it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from muse.datasets.demo import BACKGROUNDS, COLOURS, _article, _draw, _jitter

SHAPES = {"circle": 1, "square": 2, "triangle": 3}
# Object centre as a fraction of the side (x, y): the demo's names, placed nearer the middle.
POSITIONS = {"center": (0.5, 0.5), "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28),
             "bottom": (0.5, 0.72)}
PHRASES = {
    "center": ["right in the middle", "at the centre", "in the very middle"],
    "left": ["on the left-hand side", "over on the left", "toward the left"],
    "right": ["on the right-hand side", "over on the right", "toward the right"],
    "top": ["up top", "along the top", "high up"],
    "bottom": ["down below", "along the bottom", "low down"],
}
TEMPLATES = ["someone drew {obj}", "a black canvas with {obj}", "an image showing {obj}", "{obj}, nothing else",
             "here we see {obj} on {bg}", "illustration: {bare}"]
TWO_OBJECT_RATE = 0.3
JITTER = 0.08  # of the side, each way (the demo: 0.04)
RADIUS = {1: (0.10, 0.26), 2: (0.10, 0.16)}  # by objects in the image, as a fraction of the side


def write_sample(out: Path, index: int, seed: int, size: int) -> None:
    """Draw sample `index` from its own RNG (seed, index) and write its four files."""
    rng = np.random.default_rng([seed, index])
    background = str(rng.choice(list(BACKGROUNDS)))
    two = rng.random() < TWO_OBJECT_RATE
    positions = list([("left", "right"), ("top", "bottom")][rng.integers(2)]) if two \
        else [str(rng.choice(list(POSITIONS)))]
    colours = [str(c) for c in rng.choice(list(COLOURS), size=len(positions), replace=False)]
    image = Image.new("RGB", (size, size), _jitter(BACKGROUNDS[background], rng, 8))
    panoptic = Image.new("RGB", (size, size), (0, 0, 0))
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(panoptic)
    objects = []
    for segment_id, (position, colour) in enumerate(zip(positions, colours), start=1):
        shape = str(rng.choice(list(SHAPES)))
        fx, fy = POSITIONS[position]
        cx, cy = (fx + rng.uniform(-JITTER, JITTER)) * size, (fy + rng.uniform(-JITTER, JITTER)) * size
        r = min(rng.uniform(*RADIUS[len(positions)]) * size, cx - 1, size - cx - 1, cy - 1, size - cy - 1)  # in frame
        _draw(draw, shape, cx, cy, r, _jitter(COLOURS[colour], rng, 15))
        _draw(draw_ids, shape, cx, cy, r, (segment_id, 0, 0))
        ys, xs = np.nonzero(np.asarray(panoptic)[:, :, 0] == segment_id)
        objects.append({"shape": shape, "colour": colour, "position": position, "segment_id": segment_id,
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]})
    parts = [f"{o['colour']} {o['shape']} {rng.choice(PHRASES[o['position']])}" for o in objects]
    caption = str(rng.choice(TEMPLATES)).format(obj=" and ".join(_article(p) for p in parts),
                                                bare=" and ".join(parts), bg=background)
    info = {"background": background, "objects": objects,
            "segments_info": [{"id": o["segment_id"], "category_id": SHAPES[o["shape"]], "iscrowd": 0}
                              for o in objects],
            "categories": [{"id": i, "name": n, "isthing": 1} for n, i in SHAPES.items()]}
    key = f"{index:06d}"
    image.save(out / f"{key}.png")
    panoptic.save(out / f"{key}.panoptic.png")
    (out / f"{key}.txt").write_text(caption + "\n")
    (out / f"{key}.json").write_text(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.num_samples):
        write_sample(args.out_dir, i, args.seed, args.image_size)
    print(f"wrote {args.num_samples} samples to {args.out_dir}")


if __name__ == "__main__":
    main()
