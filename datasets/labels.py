"""The scene label space: one id per pixel class, shared by every segmenter and the scene tokenizer.

    0             void
    1 .. 80       COCO panoptic things (COCO order)
    81 .. 133     COCO panoptic stuff (COCO panoptic id order)
    134 .. 152    human parts (LIP's 20 classes without its background)
    153 .. 157    face parts (brows, eyes, nose, outer mouth, inner mouth)
    158 ..        dataset classes named in config (e.g. the demo's shapes)

Written into the `segments` manifest as {id: {name, group}} so maps stay
readable without this code.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
COCO_STUFF = (
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower",
    "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield",
    "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel",
    "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other", "window-blind", "window-other",
    "tree-merged", "fence-merged", "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged",
    "floor-other-merged", "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged", "paper-merged",
    "food-other-merged", "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
)
# LIP's classes in its own index order; index 0 is its background, which is not a label here.
LIP_CLASSES = (
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
    "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
    "right-shoe",
)
FACE_PARTS = ("brows", "eyes", "nose", "outer-mouth", "inner-mouth")

GROUPS = ("void", "thing", "stuff", "human", "face", "dataset")


@dataclass(frozen=True)
class LabelSpace:
    """Names and groups of every label id; index = id."""

    names: tuple[str, ...]
    groups: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.names)

    def first(self, group: str) -> int:
        return self.groups.index(group)

    def thing(self, index: int) -> int:
        """Label of COCO thing `index` (0..79)."""
        return 1 + index

    def stuff(self, index: int) -> int:
        """Label of COCO panoptic stuff `index` (0..52)."""
        return 1 + len(COCO_THINGS) + index

    def human(self, lip_index: int) -> int:
        """Label of LIP class `lip_index` (1..19); LIP background (0) maps to void."""
        return 0 if lip_index == 0 else self.first("human") + lip_index - 1

    def face(self, part: int) -> int:
        """Label of face part `part` (0..4)."""
        return self.first("face") + part

    def by_name(self, name: str) -> int:
        """Label id of a panoptic or dataset class name; KeyError names the unknown class."""
        for group in ("thing", "stuff", "dataset"):
            for i, (n, g) in enumerate(zip(self.names, self.groups)):
                if g == group and n == name:
                    return i
        raise KeyError(f"class {name!r} is not in the label space (add it to segment.dataset_classes)")

    @property
    def person(self) -> int:
        return self.thing(COCO_THINGS.index("person"))

    def to_json(self) -> dict[str, dict[str, str]]:
        return {str(i): {"name": n, "group": g} for i, (n, g) in enumerate(zip(self.names, self.groups))}


def build_label_space(dataset_classes: list[str] | tuple[str, ...] = ()) -> LabelSpace:
    """The fixed space plus the given dataset classes at the end."""
    clash = set(dataset_classes) & (set(COCO_THINGS) | set(COCO_STUFF))
    if clash:
        raise ValueError(f"dataset classes {sorted(clash)} already name COCO classes; drop them from the list")
    names = ("void", *COCO_THINGS, *COCO_STUFF, *LIP_CLASSES[1:], *FACE_PARTS, *dataset_classes)
    groups = (
        "void", *["thing"] * len(COCO_THINGS), *["stuff"] * len(COCO_STUFF), *["human"] * (len(LIP_CLASSES) - 1),
        *["face"] * len(FACE_PARTS), *["dataset"] * len(dataset_classes),
    )
    return LabelSpace(tuple(names), tuple(groups))


def palette(size: int) -> np.ndarray:
    """[size, 3] uint8 colours for label ids, stable and well spread (golden-ratio hues); void is black."""
    hues = [(i * 0.618034) % 1 for i in range(1, size)]
    colours = [(0, 0, 0)] + [tuple(int(255 * v) for v in colorsys.hsv_to_rgb(h, 0.65, 0.95)) for h in hues]
    return np.array(colours, np.uint8)


def boundaries(ids: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """Pixels whose right or lower neighbour has another id (both sides marked), optionally only inside a mask."""
    edge = np.zeros(ids.shape, bool)
    dx = ids[:, 1:] != ids[:, :-1]
    dy = ids[1:, :] != ids[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    if inside is not None:
        edge &= inside
    return edge
