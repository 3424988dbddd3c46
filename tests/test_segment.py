"""Scene maps: merge rules, each segmenter at its boundary, and the stage end to end through Ray."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from muse.config import (
    FaceSegmenterConfig,
    HumanSegmenterConfig,
    PanopticSegmenterConfig,
)
from muse.datasets.demo import panoptic_ids, write_folder
from muse.datasets.labels import COCO_STUFF, COCO_THINGS, build_label_space
from muse.datasets.shards import read_samples, shard_files
from muse.stage import execute
from muse.stages import segment, shard
from muse.stages.segment.merge import SegmentMaps, boundaries, merge
from muse.stages.segment.segmenters import (
    Detectron2Panoptic,
    FaceSegmenter,
    HumanSegmenter,
    MissingExtra,
    SceneInput,
    panoptic_to_maps,
    rasterize_face_parts,
)

SPACE = build_label_space(["circle", "square", "triangle", "diamond"])


def _maps(labels, instances=None):
    labels = np.asarray(labels)
    return SegmentMaps(labels, labels.copy() if instances is None else np.asarray(instances))


# ----------------------------------------------------------------------------- merge rules


def test_precedence_face_over_human_over_panoptic():
    person, sky = SPACE.person, SPACE.by_name("sky-other-merged")
    base = _maps([[sky, person, person, person]], [[1, 2, 2, 2]])
    hair, face_skin = SPACE.human(2), SPACE.human(13)
    human = _maps([[0, hair, face_skin, face_skin]])
    eyes = SPACE.face(1)
    face = _maps([[0, 0, 0, eyes]])
    labels, _ = merge(SPACE, base, human, face)
    assert labels.tolist() == [[sky, hair, face_skin, eyes]]


def test_fix1_human_background_is_not_a_label():
    person = SPACE.person
    base = _maps([[person, person]], [[1, 1]])
    human = _maps([[SPACE.human(0), SPACE.human(5)]])  # LIP background maps to void (0)
    assert SPACE.human(0) == 0
    labels, _ = merge(SPACE, base, human)
    assert labels.tolist() == [[person, SPACE.human(5)]]


def test_fix2_no_panoptic_person_drops_human_and_face():
    car = SPACE.thing(2)
    base = _maps([[car, car]], [[3, 3]])
    labels, edges = merge(SPACE, base, _maps([[SPACE.human(5), SPACE.human(9)]]), _maps([[SPACE.face(2), 0]]))
    assert labels.tolist() == [[car, car]]
    assert not edges.any()


def test_fix3_edges_of_instances_and_human_parts_go_to_a_separate_map():
    person = SPACE.person
    inst = np.zeros((6, 6), int)
    inst[:, :3], inst[:, 3:] = 1, 2  # two people side by side, same class
    base = SegmentMaps(np.full((6, 6), person), inst)
    labels, edges = merge(SPACE, base)
    assert set(np.unique(labels)) == {person}  # one class per pixel
    assert edges[:, 2].all() and edges[:, 3].all() and not edges[:, 0].any()
    human = np.zeros((6, 6), int)
    human[:3, :3] = SPACE.human(2)
    human[3:, :3] = SPACE.human(5)
    _, edges2 = merge(SPACE, base, SegmentMaps(human, human))
    assert edges2[2, 0] and edges2[3, 0] and not edges[2, 0]  # the part boundary adds an edge
    assert boundaries(np.array([[1, 1], [1, 1]])).sum() == 0


# ----------------------------------------------------------------------------- segmenters at their boundaries


def test_detectron2_adapter_converts_both_id_schemes():
    seg = torch.tensor([[0, 1, 1], [2, 2, 3]], dtype=torch.int32)
    separated = [
        {"id": 1, "category_id": 0, "isthing": True, "score": 0.9, "instance_id": 0},  # person
        {"id": 2, "category_id": 2, "isthing": True, "score": 0.8, "instance_id": 1},  # car
        {"id": 3, "category_id": 40, "isthing": False, "area": 1},  # stuff #40 (1-based): sky-other-merged
    ]
    maps = panoptic_to_maps(seg, separated, SPACE, "separated")
    sky = SPACE.by_name("sky-other-merged")
    assert maps.labels.tolist() == [[0, SPACE.person, SPACE.person], [SPACE.thing(2), SPACE.thing(2), sky]]
    assert maps.instances.tolist() == [[0, 1, 1], [2, 2, 3]]
    contiguous = [dict(separated[0]), dict(separated[1]), {"id": 3, "category_id": 80 + 39, "isthing": False}]
    assert panoptic_to_maps(seg, contiguous, SPACE, "contiguous").labels.tolist() == maps.labels.tolist()


def test_missing_extras_name_what_to_install():
    with pytest.raises(MissingExtra, match=r"detectron2.*muse-pipeline\[detectron2\]"):
        Detectron2Panoptic(PanopticSegmenterConfig(backend="detectron2"), SPACE, "cpu")
    with pytest.raises(MissingExtra, match=r"face-alignment.*muse-pipeline\[face\]"):
        FaceSegmenter(FaceSegmenterConfig(), SPACE, "cpu")
    with pytest.raises(ValueError, match="segment.human.weights"):
        HumanSegmenter(HumanSegmenterConfig(), SPACE, "cpu")
    # A run checks before any stage, without loading any model.
    from muse.config import load_config

    with pytest.raises(MissingExtra, match="detectron2"):
        segment.preflight(load_config("tiny", overrides=["segment.segmenters=[panoptic]",
                                                         "segment.panoptic.backend=detectron2"]))
    with pytest.raises(MissingExtra, match="segment.human.weights"):
        segment.preflight(load_config("tiny", overrides=["segment.segmenters=[masks, human]"]))
    with pytest.raises(MissingExtra, match="'/nope.pth': no such file"):
        segment.preflight(load_config("tiny", overrides=["segment.segmenters=[masks, human]",
                                                         "segment.human.weights=/nope.pth"]))


def test_human_parser_runs_on_random_weights():
    seg = HumanSegmenter(HumanSegmenterConfig(allow_random_weights=True, input_size=64), SPACE, "cpu")
    rgb = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    maps = seg([SceneInput("k", rgb, {}, None), SceneInput("k2", rgb[::-1].copy(), {}, None)])
    assert len(maps) == 2 and maps[0].labels.shape == (40, 56)
    human = {SPACE.human(i) for i in range(1, 20)}
    assert set(np.unique(maps[0].labels)) <= human | {0}


def test_human_parser_loads_its_own_state_dict_strictly(tmp_path):
    from muse.models.human_parser import HumanParser, load_human_parser

    model = HumanParser(blocks=(1, 1, 1, 1))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "schp.pth")
    loaded = load_human_parser(tmp_path / "schp.pth", blocks=(1, 1, 1, 1))
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an SCHP LIP checkpoint"):
        load_human_parser(tmp_path / "bad.pth", blocks=(1, 1, 1, 1))


def test_face_parts_rasterized_from_68_landmarks():
    # A synthetic frontal face: points laid out like the iBUG 68 scheme on a 100x100 canvas.
    pts = np.zeros((68, 2))
    pts[0:17] = np.c_[np.linspace(20, 80, 17), 60 + 20 * np.sin(np.linspace(0, np.pi, 17))]  # jaw
    pts[17:22] = np.c_[np.linspace(25, 45, 5), np.full(5, 30)]  # right brow
    pts[22:27] = np.c_[np.linspace(55, 75, 5), np.full(5, 30)]  # left brow
    pts[27:31] = np.c_[np.full(4, 50), np.linspace(38, 55, 4)]  # nose bridge
    pts[31:36] = np.c_[np.linspace(43, 57, 5), np.full(5, 60)]  # nostrils
    for start, cx in ((36, 35), (42, 65)):  # eyes: hexagons
        ang = np.linspace(0, 2 * np.pi, 7)[:-1]
        pts[start:start + 6] = np.c_[cx + 7 * np.cos(ang), 40 + 3 * np.sin(ang)]
    ang = np.linspace(0, 2 * np.pi, 13)[:-1]
    pts[48:60] = np.c_[50 + 14 * np.cos(ang), 75 + 6 * np.sin(ang)]  # outer lips
    ang = np.linspace(0, 2 * np.pi, 9)[:-1]
    pts[60:68] = np.c_[50 + 8 * np.cos(ang), 75 + 2 * np.sin(ang)]  # inner mouth
    labels = rasterize_face_parts([pts], (100, 100), SPACE)
    assert labels.shape == (100, 100)
    assert labels[30, 35] == SPACE.face(0)  # brow
    assert labels[40, 35] == SPACE.face(1) and labels[40, 65] == SPACE.face(1)  # eyes
    assert labels[58, 50] == SPACE.face(2)  # nose
    assert labels[75, 40] == SPACE.face(3)  # lips
    assert labels[75, 50] == SPACE.face(4)  # inner mouth paints over the lips
    assert labels[5, 5] == 0 and set(np.unique(labels)) == {0, *(SPACE.face(p) for p in range(5))}


# ----------------------------------------------------------------------------- the stage through Ray


def _seg_cfg(small_config, *extra):
    return small_config("segment.dataset_classes=[circle, square, triangle, diamond]", "segment.batch_size=8", *extra)


def test_masks_segmenter_end_to_end_matches_ground_truth(ray_local, store, small_config):
    cfg = _seg_cfg(small_config)
    shards = execute(shard, cfg, {}, store)
    art = execute(segment, cfg, {"shards": shards}, store)
    m = art.manifest
    assert m.metrics["samples"] == m.metrics["segmented"] == 24 and m.metrics["failed"] == 0
    assert m.details["label_space"]["158"] == {"name": "circle", "group": "dataset"}
    for split in ("train", "val"):
        names = [p.name for p in shard_files(shards.path, split)]
        assert sorted(p.name for p in (art.path / split).glob("*.tar")) == names  # same shard files
        truth = {s["key"]: s for s in read_samples(shards.path, split)}
        urls = [str(p) for p in sorted((art.path / split).glob("*.tar"))]
        got = {x["__key__"]: x for x in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
        assert set(got) == set(truth)  # no key lost or duplicated
        for key, s in truth.items():
            labels = np.asarray(Image.open(io.BytesIO(got[key]["seg.png"])))
            ids = panoptic_ids(s["panoptic"])
            expected = np.zeros_like(labels)
            for seg_info, obj in zip(s["info"]["source_info"]["segments_info"], s["info"]["source_info"]["objects"]):
                expected[ids == seg_info["id"]] = SPACE.by_name(obj["shape"])
            assert np.array_equal(labels, expected)
            edges = np.asarray(Image.open(io.BytesIO(got[key]["edge.png"])))
            assert set(np.unique(edges)) <= {0, 255} and edges[labels > 0].any()
    assert (art.path / "previews" / "scenes.png").is_file()
    assert {r["label"] for r in m.details["tables"]["classes"]} >= {"void"}


def test_failed_samples_are_recorded_and_the_threshold_applies(ray_local, tmp_path, store, small_config):
    src = write_folder(tmp_path / "demo", num_samples=6, image_size=48, seed=1)
    Image.new("RGB", (48, 48), (10, 200, 10)).save(src / "zz_nomask.png")  # an image without a mask
    (src / "zz_nomask.txt").write_text("a green square")
    cfg = _seg_cfg(small_config, f"shard.source={src}", "shard.val_fraction=0")
    shards = execute(shard, cfg, {}, store)
    with pytest.raises(RuntimeError, match=r"1 of 7 samples failed.*no panoptic.png mask"):
        execute(segment, cfg, {"shards": shards}, store)
    assert store.list("segments") == []  # nothing committed
    lenient = _seg_cfg(small_config, f"shard.source={src}", "shard.val_fraction=0", "segment.max_failed_fraction=0.2")
    art = execute(segment, lenient, {"shards": shards}, store)
    assert art.manifest.metrics["failed"] == 1 and art.manifest.metrics["segmented"] == 6
    assert "no panoptic.png mask" in art.manifest.details["failures"][0]["reason"]


@pytest.mark.slow
def test_killed_worker_leaves_no_duplicate_or_missing_keys(ray_local, store, small_config):
    """SIGKILL a segmenter actor mid-run: Ray restarts it and retries; every key lands exactly once."""
    import os
    import signal
    import threading
    import time

    import psutil

    cfg = _seg_cfg(small_config, "demo.num_samples=400", "segment.batch_size=2", "shard.samples_per_shard=50")
    shards = execute(shard, cfg, {}, store)
    result, killed = {}, []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed and "art" not in result:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "SegmenterActor" in " ".join(p.info["cmdline"] or []):  # Ray titles actor processes
                    time.sleep(2)  # let it get some batches in flight
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
            time.sleep(0.2)

    t = threading.Thread(target=killer)
    t.start()
    result["art"] = execute(segment, cfg, {"shards": shards}, store)
    t.join()
    assert killed, "no segmenter actor was seen alive"
    m = result["art"].manifest
    assert m.metrics["samples"] == m.metrics["segmented"] == 400 and m.metrics["failed"] == 0
    for split in ("train", "val"):
        urls = [str(p) for p in sorted((result["art"].path / split).glob("*.tar"))]
        keys = [x["__key__"] for x in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
        assert len(keys) == len(set(keys))
        assert set(keys) == {s["key"] for s in read_samples(shards.path, split)}


# ----------------------------------------------------------------------------- the transformers panoptic backend


def _tiny_mask2former(path, names, label=None):
    """A randomly initialised Mask2Former of the COCO-panoptic checkpoints' class, saved like one; with `label`,
    every query predicts that class."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=64, num_queries=6, id2label=dict(enumerate(names)))
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if label is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.fill_(-10.0)
            model.class_predictor.bias[label] = 10.0
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}, size_divisor=32).save_pretrained(path)
    return path


COCO_NAMES = [*COCO_THINGS, *COCO_STUFF]


def test_hub_panoptic_output_maps_to_the_label_space():
    from muse.stages.segment.segmenters import hub_maps, label_of_class

    labels = label_of_class(SPACE, dict(enumerate(COCO_NAMES)))
    sky = COCO_NAMES.index("sky-other-merged")
    seg = torch.tensor([[0, 1, 1], [2, 2, -1]])  # 0 and -1: no segment
    maps = hub_maps(seg, [{"id": 1, "label_id": 0}, {"id": 2, "label_id": sky}], labels)
    assert maps.labels.tolist() == [[0, SPACE.person, SPACE.person], [SPACE.by_name("sky-other-merged")] * 2 + [0]]
    assert maps.instances.tolist() == [[0, 1, 1], [2, 2, 0]]
    # Unnamed classes of a 133-class model count contiguously: things, then stuff; anything else is refused.
    assert label_of_class(SPACE, {i: f"LABEL_{i}" for i in range(133)}) == labels
    with pytest.raises(ValueError, match="not COCO panoptic's"):
        label_of_class(SPACE, {0: "cat", 1: "LABEL_1"})


@pytest.mark.parametrize("name,group", [("person", "thing"), ("sky-other-merged", "stuff")])
def test_mask2former_segments_images_into_label_space_maps(tmp_path, name, group):
    from muse.stages.segment.segmenters import panoptic_segmenter

    path = _tiny_mask2former(tmp_path / "m2f", COCO_NAMES, label=COCO_NAMES.index(name))
    seg = panoptic_segmenter(PanopticSegmenterConfig(model=str(path), threshold=0.5), SPACE, "cpu")
    rgb = np.random.default_rng(0).integers(0, 255, (48, 56, 3), dtype=np.uint8)
    maps = seg([SceneInput("a", rgb, {}, None), SceneInput("b", rgb[::-1].copy(), {}, None)])
    assert len(maps) == 2 and maps[0].labels.shape == (48, 56)
    for m in maps:
        painted = m.labels > 0
        assert painted.mean() > 0.5 and set(np.unique(m.labels[painted])) == {SPACE.by_name(name)}
        assert (m.instances[painted] > 0).all() and (m.instances[~painted] == 0).all()
        if group == "stuff":  # stuff is one region per class (fused), as detectron2 gives it
            assert len(np.unique(m.instances[painted])) == 1


def test_segmenters_auto_picks_masks_then_local_models_then_none(tmp_path, monkeypatch):
    from muse.config import SegmentConfig
    from muse.stages.segment.segmenters import plan

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    c = SegmentConfig()
    assert c.segmenters == "auto"
    assert plan(c, masks_shipped=True).segmenters == ("masks",)
    none = plan(c, masks_shipped=False)
    assert none.segmenters == () and not none.present and "neither a local directory nor in the Hugging Face cache" \
        in none.plan
    mistyped = plan(SegmentConfig(panoptic={"model": str(tmp_path / "no-such-model")}), masks_shipped=False)
    assert mistyped.segmenters == () and "no-such-model" in mistyped.plan
    local = SegmentConfig(panoptic={"model": str(_tiny_mask2former(tmp_path / "m2f", COCO_NAMES))})
    assert plan(local, masks_shipped=False).segmenters == ("panoptic",)
    assert plan(SegmentConfig(segmenters="none"), masks_shipped=True).segmenters == ()
    assert plan(SegmentConfig(segmenters=["masks"]), masks_shipped=False).segmenters == ("masks",)
