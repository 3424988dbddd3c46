"""The pixel-based caption checker used by `evaluate` on demo data."""

from __future__ import annotations

from dataclasses import asdict

from PIL import Image

from muse.datasets.demo import make_sample
from muse.datasets.demo_check import grade


def test_ground_truth_images_pass_and_wrong_facts_fail():
    right, wrong = [], []
    for i in range(60):
        s = make_sample(i, 128, 0)
        objects = [asdict(o) for o in s.objects]
        right += grade(s.image.resize((64, 64)), objects)
        for o in objects:
            o["shape"] = {"circle": "square", "square": "circle", "triangle": "diamond", "diamond": "triangle"}[o["shape"]]
            o["position"] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top",
                             "center": "left"}[o["position"]]
        wrong += grade(s.image, objects)
    assert all(r["colour"] and r["shape"] and r["position"] for r in right)
    assert not any(r["shape"] or r["position"] for r in wrong)
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert grade(blank, [asdict(make_sample(0, 64, 0).objects[0])]) == [{"colour": False, "shape": False,
                                                                          "position": False}]
