"""The `segments` artifact format: sidecar tars of scene maps, or a recorded "no scene maps".

    STORE/segments/VERSION/train/000000.tar   KEY.seg.png (label ids) + KEY.edge.png, same keys as the shard
    STORE/segments/VERSION/val/...

The manifest's details say whether the artifact holds scene maps (`scene_maps`), which
segmenters made them and why those (`plan`), and the label space. An artifact without scene
maps has no tars: the scene tokenizer and the `seg_tokens` column are skipped downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from muse.artifacts.store import Artifact, ArtifactError


@dataclass(frozen=True)
class SceneMaps:
    """Which segmenters a run uses (none: no scene maps) and why, in a line; what a `segments` artifact holds."""

    segmenters: tuple[str, ...]
    plan: str

    @property
    def present(self) -> bool:
        return bool(self.segmenters)


def details(scene: SceneMaps) -> dict:
    """The manifest details a `segments` artifact records for `scene_maps_of`."""
    return {"scene_maps": scene.present, "segmenters": list(scene.segmenters), "plan": scene.plan}


def scene_maps_of(segments: Artifact) -> SceneMaps:
    """Read back what `details` recorded; an error naming the artifact when it is not a segments artifact."""
    d = segments.manifest.details
    try:
        return SceneMaps(tuple(d["segmenters"]), str(d["plan"]))
    except KeyError as e:
        raise ArtifactError(f"{segments.ref}: manifest details have no {e.args[0]!r} (not a segments artifact, "
                            "or one written before scene maps were recorded: rerun `muse run segment`)") from None
