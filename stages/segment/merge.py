"""Merging segmenter outputs into one scene map, with the mini Make-A-Scene reproduction's three fixes.

Precedence: face parts over human parts over panoptic. The fixes:
  1. the human parser's background is not a label: it never paints over panoptic;
  2. if panoptic found no person, the human and face maps are dropped (they hallucinate people);
  3. edges come from instance and human-part boundaries into a separate map, so the label map
     keeps one class per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from muse.datasets.labels import LabelSpace, boundaries


@dataclass
class SegmentMaps:
    """One segmenter's result for one image: label-space ids and instance ids (0 = none)."""

    labels: np.ndarray  # [H, W] int, ids of the shared label space
    instances: np.ndarray  # [H, W] int, distinct per instance / part region


def merge(
    space: LabelSpace,
    base: SegmentMaps | None,
    human: SegmentMaps | None = None,
    face: SegmentMaps | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels [H, W] uint16, edges [H, W] uint8 0/255) from whichever maps a sample has."""
    shape = next(m.labels.shape for m in (base, human, face) if m is not None)
    labels = np.zeros(shape, np.uint16) if base is None else base.labels.astype(np.uint16)
    edges = np.zeros(shape, bool) if base is None else boundaries(base.instances, base.instances > 0)

    # Fix 2: without a panoptic person, human/face maps are dropped. With no base at all there is
    # nothing to check against, so they are kept.
    keep_people = base is None or bool((base.labels == space.person).any())
    if keep_people and human is not None:
        parts = human.labels > 0  # fix 1: background (0) paints nothing
        labels[parts] = human.labels[parts]
        edges |= boundaries(human.labels, parts)
    if keep_people and face is not None:
        parts = face.labels > 0
        labels[parts] = face.labels[parts]
    return labels, edges.astype(np.uint8) * 255
