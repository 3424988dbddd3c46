"""A user's own captioned images with no masks, end to end: full-train through the flow, then `muse generate`."""

import pytest
from prefect.exceptions import FailedRun

from muse.artifacts.store import ArtifactStore
from muse.cli import main
from muse.datasets.demo import write_folder
from muse.datasets.segments import scene_maps_of
from muse.flows.pipeline import muse
from tests.conftest import SMALL


def _captioned_images(root):
    """The demo as plain images with captions: no panoptic masks, no json."""
    src = write_folder(root, num_samples=24, image_size=48, seed=5)
    for p in [*src.glob("*.panoptic.png"), *src.glob("*.json")]:
        p.unlink()
    return src


def test_captioned_images_without_masks_train_end_to_end_and_generate(prefect_api, ray_local, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # no segmenter weights here
    src = _captioned_images(tmp_path / "photos")
    store = ArtifactStore(tmp_path / "store")
    produced = muse(target="full-train", preset="tiny", overrides=SMALL, source=str(src), store=str(store.root))
    assert {"shards", "segments", "vqseg", "tokens", "base", "superres", "decoder", "report"} <= set(produced)

    scene = scene_maps_of(store.get("segments"))
    assert not scene.present and scene.segmenters == ()
    assert "the source ships no masks" in scene.plan and "segment.panoptic.model" in scene.plan
    assert store.get("segments").manifest.metrics["samples"] == 24
    vqseg = store.get("vqseg")
    assert vqseg.manifest.metrics["steps"] == 0 and vqseg.manifest.files == []  # recorded, not trained
    tokens = store.get("tokens")
    assert "seg_tokens" not in tokens.manifest.details["schema"] and tokens.manifest.details["scene_maps"] is False

    out = tmp_path / "samples"
    assert main(["generate", "a red circle on the left", "a blue square", "--store", str(store.root),
                 "--out", str(out), "--steps", "2", "--superres-steps", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png"]

    # Scene conditioning without scene maps: one line, before any tokenizer trains.
    with pytest.raises(FailedRun, match=r"^segment: train_base.scene_conditioning needs scene maps, but this run has "
                                        r"none \(auto: the source ships no masks"):
        muse(target="full-train", preset="tiny", overrides=[*SMALL, "train_base.scene_conditioning=true"],
             source=str(src), store=str(tmp_path / "store2"))
    assert ArtifactStore(tmp_path / "store2").kinds() == ["shards"]


def test_the_demo_still_segments_from_its_masks(small_config):
    from muse.stages import segment

    assert "auto: the source's masks where it ships them" in segment.preflight(small_config())


def test_scene_conditioning_with_segmenters_none_fails_before_anything_runs(prefect_api, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(FailedRun, match=r"^train_base.scene_conditioning needs scene maps, but segment.segmenters is none"):
        muse(target="full-train", preset="tiny", overrides=[*SMALL, "segment.segmenters=none",
                                                            "train_base.scene_conditioning=true"], store=str(store))
    assert not store.exists()
