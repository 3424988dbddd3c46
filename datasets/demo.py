"""The demo dataset: coloured shapes on plain backgrounds, with captions and ground-truth masks.

Every sample is drawn from its own RNG seeded by (seed, index), so sample i is
the same whatever the dataset size. A caption names each shape's colour, kind
and position in varied phrasing; the structured facts are kept beside it so a
pixel-based checker can later grade generated images against their captions.

Masks follow the COCO-panoptic convention: an RGB PNG whose pixel encodes a
segment id (R + 256 G + 65536 B, 0 = void) and a `segments_info` list mapping
each id to a category. Written as a folder source, a sample is
`KEY.png`, `KEY.txt`, `KEY.json`, `KEY.panoptic.png` (webdataset-style keys).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
# Category ids of the shapes in the masks' segments_info (0 is void).
SHAPES: dict[str, int] = {"circle": 1, "square": 2, "triangle": 3, "diamond": 4}
# Object centre as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.24, 0.5),
    "right": (0.76, 0.5),
    "top": (0.5, 0.24),
    "bottom": (0.5, 0.76),
}
_PAIRS = [("left", "right"), ("top", "bottom")]
_PHRASES = {
    "center": ["in the center", "in the middle"],
    "left": ["on the left", "at the left"],
    "right": ["on the right", "at the right"],
    "top": ["at the top", "near the top"],
    "bottom": ["at the bottom", "near the bottom"],
}
_TEMPLATES = [
    "{obj}",
    "{bare}",
    "a picture of {obj} on a {bg} background",
    "there is {obj}",
    "a simple drawing of {obj}",
]
TWO_OBJECT_RATE = 0.25


@dataclass(frozen=True)
class DemoObject:
    """One shape: what the caption says about it and where its pixels are."""

    shape: str
    colour: str
    position: str
    segment_id: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1


@dataclass
class DemoSample:
    key: str
    image: Image.Image
    caption: str
    background: str
    objects: list[DemoObject]
    panoptic: Image.Image  # RGB-encoded segment ids

    def info(self) -> dict:
        """The json sidecar: structured caption facts and the panoptic segments_info."""
        return {
            "background": self.background,
            "objects": [asdict(o) for o in self.objects],
            "segments_info": [
                {"id": o.segment_id, "category_id": SHAPES[o.shape], "iscrowd": 0} for o in self.objects
            ],
            "categories": [{"id": i, "name": n, "isthing": 1} for n, i in SHAPES.items()],
        }


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r * 1.2), (cx + r, cy), (cx, cy + r * 1.2), (cx - r, cy)]
    return None  # circle: drawn as an ellipse


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    poly = _polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def make_sample(index: int, image_size: int, seed: int) -> DemoSample:
    """Draw sample `index` deterministically from (seed, index)."""
    rng = np.random.default_rng([seed, index])
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < TWO_OBJECT_RATE:
        positions = list(_PAIRS[rng.integers(len(_PAIRS))])
        radius_range = (0.12, 0.17)
    else:
        positions = [str(rng.choice(list(POSITIONS)))]
        radius_range = (0.14, 0.22)
    colours = [str(c) for c in rng.choice(list(COLOURS), size=len(positions), replace=False)]

    image = Image.new("RGB", (image_size, image_size), _jitter(BACKGROUNDS[background], rng, 8))
    panoptic = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(panoptic)
    objects = []
    for i, (position, colour) in enumerate(zip(positions, colours)):
        shape = str(rng.choice(list(SHAPES)))
        fx, fy = POSITIONS[position]
        cx = (fx + rng.uniform(-0.04, 0.04)) * image_size
        cy = (fy + rng.uniform(-0.04, 0.04)) * image_size
        r = rng.uniform(*radius_range) * image_size
        segment_id = i + 1
        _draw(draw, shape, cx, cy, r, _jitter(COLOURS[colour], rng, 15))
        _draw(draw_ids, shape, cx, cy, r, (segment_id, 0, 0))
        ys, xs = np.nonzero(np.asarray(panoptic)[:, :, 0] == segment_id)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(DemoObject(shape, colour, position, segment_id, bbox))

    parts = [f"{o.colour} {o.shape} {rng.choice(_PHRASES[o.position])}" for o in objects]
    template = str(rng.choice(_TEMPLATES))
    caption = template.format(obj=" and ".join(_article(p) for p in parts), bare=" and ".join(parts), bg=background)
    return DemoSample(f"{index:06d}", image, caption, background, objects, panoptic)


def generate(num_samples: int, image_size: int, seed: int) -> Iterator[DemoSample]:
    """Samples 0..num_samples-1."""
    for i in range(num_samples):
        yield make_sample(i, image_size, seed)


def write_folder(out_dir: str | Path, num_samples: int, image_size: int, seed: int) -> Path:
    """Write the demo as a folder source: KEY.png, KEY.txt, KEY.json, KEY.panoptic.png per sample."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in generate(num_samples, image_size, seed):
        s.image.save(out / f"{s.key}.png")
        (out / f"{s.key}.txt").write_text(s.caption + "\n")
        (out / f"{s.key}.json").write_text(json.dumps(s.info()))
        s.panoptic.save(out / f"{s.key}.panoptic.png")
    return out


def panoptic_ids(panoptic: Image.Image | np.ndarray) -> np.ndarray:
    """Decode a COCO-panoptic RGB PNG into an int32 segment-id map (R + 256 G + 65536 B)."""
    rgb = np.asarray(panoptic).astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
