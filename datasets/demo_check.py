"""Grading an image against a demo caption from its pixels: is the named colour there, where, in what shape.

For each object the caption names: pixels within a distance of the named colour form its
mask (the largest blob when two objects share nothing else); the colour counts as present
when the mask covers enough of the image, the position is the nearest named position to
the mask's centroid (left/right, top/bottom or center), and the shape comes from the
mask's fill of its bounding box (square ~1, circle ~pi/4, triangle and diamond ~1/2) and,
for the last two, from where the widest row is (bottom: triangle, middle: diamond).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .demo import COLOURS, POSITIONS

COLOUR_DISTANCE = 70.0  # RGB distance to the named colour (jitter in the data is +-15 per channel)
MIN_AREA = 0.01  # fraction of the image the colour must cover to count as present


def colour_mask(rgb: np.ndarray, colour: str) -> np.ndarray:
    """Pixels nearer to `colour` than COLOUR_DISTANCE and nearer to it than to any other demo colour."""
    pixels = rgb.astype(np.float32)
    dists = {name: np.linalg.norm(pixels - np.array(value, np.float32), axis=-1) for name, value in COLOURS.items()}
    others = np.min(np.stack([d for n, d in dists.items() if n != colour]), axis=0)
    return (dists[colour] < COLOUR_DISTANCE) & (dists[colour] < others)


def classify_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    fill = box.mean()
    if fill > 0.89:
        return "square"
    if fill > 0.66:
        return "circle"
    widths = box.sum(1)
    widest = (np.argmax(widths) + 0.5) / len(widths)
    return "triangle" if widest > 0.7 else "diamond"


def classify_position(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cx, cy = xs.mean() / w, ys.mean() / h
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def grade(image: Image.Image | np.ndarray, objects: list[dict]) -> list[dict[str, bool]]:
    """Per named object: {"colour", "shape", "position"} correct or not (shape/position false without colour)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    out = []
    for obj in objects:
        mask = colour_mask(rgb, obj["colour"])
        present = mask.mean() >= MIN_AREA
        out.append({"colour": bool(present),
                    "shape": bool(present and classify_shape(mask) == obj["shape"]),
                    "position": bool(present and classify_position(mask) == obj["position"])})
    return out
