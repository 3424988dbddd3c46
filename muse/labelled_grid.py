"""Image grids a person can read: each column under its caption's text, each row named.

The training previews (sampled vs. real, one row per guide scale) and the preview pages of
`shard` and `evaluate` are read in the Prefect UI and TensorBoard without the data at hand:
a grid of tiny unlabeled cells says nothing about what each sample was asked to be.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CHAR_WIDTH = 6  # PIL's default bitmap font: pixels per character
LINE_HEIGHT = 11
MIN_CELL = 96  # cells are scaled up (nearest) to at least this many pixels, so a caption fits under them


def caption_lines(text: str, width: int, max_lines: int = 3) -> list[str]:
    """`text` wrapped at word boundaries into lines of at most `width` pixels; the last kept line ends in '…'
    when words were left out."""
    chars = max(width // CHAR_WIDTH, 1)
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > chars:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()[:chars]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: chars - 1] + "…"
    return lines


def label_grid(grid: np.ndarray, captions: list[str], row_labels: list[str], max_lines: int = 3) -> np.ndarray:
    """A grid of `len(row_labels)` rows by `len(captions)` equal cells (HWC uint8) with a label column on the
    left and each column's caption under the last row."""
    rows, cols = len(row_labels), len(captions)
    cell_h, cell_w = grid.shape[0] // rows, grid.shape[1] // cols
    scale = max(1, -(-MIN_CELL // min(cell_h, cell_w)))  # ceil: the smallest factor that reaches MIN_CELL
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    cell_h, cell_w = cell_h * scale, cell_w * scale
    label_w = max(CHAR_WIDTH * max(len(label) for label in row_labels) + 8, 48)
    band = LINE_HEIGHT * max_lines + 6
    canvas = Image.new("RGB", (label_w + image.width, image.height + band), "white")
    canvas.paste(image, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(row_labels):
        draw.text((4, r * cell_h + cell_h // 2 - LINE_HEIGHT // 2), label, fill="black")
    for c, caption in enumerate(captions):
        lines = caption_lines(caption, cell_w - 4, max_lines)
        draw.multiline_text((label_w + c * cell_w + 2, image.height + 3), "\n".join(lines), fill="black", spacing=1)
    return np.asarray(canvas)
