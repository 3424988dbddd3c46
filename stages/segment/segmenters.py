"""Segmenters: a batch of images -> per-image label maps (in the shared label space) and instance maps.

Each segmenter has a role in the merge: `base` (panoptic, or a dataset's ground-truth masks),
`human` (parts over people) or `face` (parts over faces). Model weights are paths or hub ids in
config; optional packages (detectron2, face-alignment) are imported when the segmenter is
built and their absence is an error naming the extra to install. `plan` turns the configured
`segmenters` (a list, `auto` or `none`) into the ones a run uses, and says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

from muse.config import (
    ConfigError,
    FaceSegmenterConfig,
    HumanSegmenterConfig,
    MasksSegmenterConfig,
    PanopticSegmenterConfig,
    SegmentConfig,
)
from muse.datasets.demo import panoptic_ids
from muse.datasets.labels import COCO_STUFF, COCO_THINGS, LIP_CLASSES, LabelSpace
from muse.datasets.segments import SceneMaps

from .merge import SegmentMaps

ROLES = {"masks": "base", "panoptic": "base", "human": "human", "face": "face"}


class SegmentError(ValueError):
    """This sample cannot be segmented; the message is the reason recorded for it."""


class MissingExtra(ConfigError):
    """An optional dependency or the weights of a segmenter are not on this machine; the message says what to do."""


@dataclass
class SceneInput:
    """What a segmenter sees of one sample."""

    key: str
    rgb: np.ndarray  # [H, W, 3] uint8
    info: dict  # the shard's json
    panoptic: np.ndarray | None  # [H, W, 3] uint8 COCO-panoptic ids, when the source shipped masks


class Segmenter(Protocol):
    role: str

    def __call__(self, batch: list[SceneInput]) -> list[SegmentMaps]: ...


def require_extra(name: str, panoptic_backend: str = "transformers") -> None:
    """Import the optional package segmenter `name` needs; MissingExtra naming the extra when absent."""
    try:
        if name == "panoptic" and panoptic_backend == "detectron2":
            import detectron2  # noqa: F401
        elif name == "face":
            import face_alignment  # noqa: F401
    except ImportError:
        if name == "panoptic":
            raise MissingExtra(
                "segmenter 'panoptic' with segment.panoptic.backend detectron2 needs detectron2, which is not "
                "installed. It is not on PyPI: pip install 'muse-pipeline[detectron2]' (builds it from GitHub; "
                "needs a compiler and torch), or use segment.panoptic.backend: transformers"
            ) from None
        raise MissingExtra(
            "segmenter 'face' needs face-alignment, which is not installed: pip install 'muse-pipeline[face]'"
        ) from None


# ----------------------------------------------------------------------------- masks (ground truth)


class MasksSegmenter:
    """Reads the COCO-panoptic mask a dataset shipped with each image; maps its categories by name."""

    role = "base"

    def __init__(self, config: MasksSegmenterConfig, space: LabelSpace):
        self.space = space
        self.categories: dict[int, str] | None = None
        if config.categories_file:
            data = json.loads(Path(config.categories_file).read_text())
            self.categories = {int(c["id"]): c["name"] for c in data["categories"]}

    def segment_one(self, x: SceneInput) -> SegmentMaps:
        if x.panoptic is None:
            raise SegmentError("no panoptic.png mask in the shard (the source shipped no masks)")
        source = x.info.get("source_info", {})
        if "segments_info" not in source:
            raise SegmentError("json has no source_info.segments_info")
        categories = self.categories or {int(c["id"]): c["name"] for c in source.get("categories", [])}
        ids = panoptic_ids(x.panoptic)
        labels = np.zeros(ids.shape, np.uint16)
        for seg in source["segments_info"]:
            name = categories.get(int(seg["category_id"]))
            if name is None:
                raise SegmentError(f"category_id {seg['category_id']} has no name (categories_file?)")
            try:
                labels[ids == int(seg["id"])] = self.space.by_name(name)
            except KeyError as e:
                raise SegmentError(str(e.args[0])) from None
        return SegmentMaps(labels, ids.astype(np.int32))

    def __call__(self, batch: list[SceneInput]) -> list[SegmentMaps]:
        return [self.segment_one(x) for x in batch]


# ----------------------------------------------------------------------------- panoptic (detectron2)


def panoptic_to_maps(panoptic_seg, segments_info: list[dict], space: LabelSpace, id_scheme: str) -> SegmentMaps:
    """detectron2's `panoptic_seg` ([H, W] segment ids, 0 = unlabeled) + `segments_info` -> label-space maps.

    'separated' (Panoptic FPN): things carry category_id 0..79, stuff 1..53 (0 is its merged 'things').
    'contiguous' (Panoptic-DeepLab, Mask2Former): 0..132, all things before all stuff.
    """
    ids = np.asarray(panoptic_seg.cpu() if hasattr(panoptic_seg, "cpu") else panoptic_seg).astype(np.int32)
    labels = np.zeros(ids.shape, np.uint16)
    instances = np.zeros(ids.shape, np.int32)
    n_things = len(COCO_THINGS)
    for info in segments_info:
        cat, isthing = int(info["category_id"]), bool(info["isthing"])
        if id_scheme == "separated":
            label = space.thing(cat) if isthing else space.stuff(cat - 1)
        else:
            label = space.thing(cat) if cat < n_things else space.stuff(cat - n_things)
        mask = ids == int(info["id"])
        labels[mask] = label
        instances[mask] = int(info["id"])
    return SegmentMaps(labels, instances)


class Detectron2Panoptic:
    """detectron2 panoptic model (Panoptic FPN by default), one image at a time through DefaultPredictor."""

    role = "base"

    def __init__(self, config: PanopticSegmenterConfig, space: LabelSpace, device: str):
        require_extra("panoptic", "detectron2")
        from detectron2 import model_zoo
        from detectron2.config import get_cfg
        from detectron2.engine import DefaultPredictor

        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(config.config_name))
        cfg.MODEL.WEIGHTS = config.weights or model_zoo.get_checkpoint_url(config.config_name)
        cfg.MODEL.DEVICE = device
        self.predictor = DefaultPredictor(cfg)
        self.space, self.id_scheme = space, config.id_scheme

    def __call__(self, batch: list[SceneInput]) -> list[SegmentMaps]:
        out = []
        for x in batch:
            seg, infos = self.predictor(np.ascontiguousarray(x.rgb[:, :, ::-1]))["panoptic_seg"]  # BGR in
            out.append(panoptic_to_maps(seg, infos, self.space, self.id_scheme))
        return out


def label_of_class(space: LabelSpace, id2label: dict[int, str]) -> dict[int, int]:
    """A COCO-panoptic model's class ids -> label-space ids, by class name (the checkpoints name the 133
    COCO-panoptic classes as detectron2 does); models whose names are not COCO's but count 133 classes are
    taken as contiguous (80 things, then 53 stuff)."""
    try:
        return {int(i): space.by_name(name) for i, name in id2label.items()}
    except KeyError as e:
        if len(id2label) != len(COCO_THINGS) + len(COCO_STUFF):
            raise ConfigError(f"segment.panoptic.model: its classes are not COCO panoptic's ({e.args[0]})") from None
        n = len(COCO_THINGS)
        return {int(i): space.thing(int(i)) if int(i) < n else space.stuff(int(i) - n) for i in id2label}


def hub_maps(segmentation, segments_info: list[dict], labels: dict[int, int]) -> SegmentMaps:
    """transformers' `post_process_panoptic_segmentation` result ([H, W] segment ids, 0 or -1 = none, and
    segments_info with `id` and `label_id`) -> label-space maps."""
    ids = np.asarray(segmentation.cpu() if hasattr(segmentation, "cpu") else segmentation).astype(np.int32)
    out = np.zeros(ids.shape, np.uint16)
    instances = np.zeros(ids.shape, np.int32)
    for info in segments_info:
        mask = ids == int(info["id"])
        out[mask] = labels[int(info["label_id"])]
        instances[mask] = int(info["id"])
    return SegmentMaps(out, instances)


class HubPanoptic:
    """A Hugging Face transformers COCO-panoptic model (Mask2Former, MaskFormer), batched."""

    role = "base"

    def __init__(self, config: PanopticSegmenterConfig, space: LabelSpace, device: str):
        import torch
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

        self.torch, self.device, self.threshold = torch, device, config.threshold
        try:
            self.processor = AutoImageProcessor.from_pretrained(config.model)
            self.model = AutoModelForUniversalSegmentation.from_pretrained(config.model).to(device).eval()
        except OSError as e:
            raise MissingExtra(f"segment.panoptic.model {config.model!r}: cannot load it ({_first_line(e)}); "
                               "set it to a local checkpoint directory or a reachable hub id") from None
        if self.model.config.model_type not in ("mask2former", "maskformer"):
            raise ConfigError(f"segment.panoptic.model {config.model!r} is a {self.model.config.model_type} model; "
                              "the transformers backend runs Mask2Former and MaskFormer checkpoints")
        self.labels = label_of_class(space, self.model.config.id2label)
        groups = space.groups
        self.stuff = {i for i, label in self.labels.items() if groups[label] == "stuff"}  # merged per class

    def __call__(self, batch: list[SceneInput]) -> list[SegmentMaps]:
        inputs = self.processor(images=[x.rgb for x in batch], return_tensors="pt").to(self.device)
        with self.torch.no_grad():
            outputs = self.model(**inputs)
        results = self.processor.post_process_panoptic_segmentation(
            outputs, threshold=self.threshold, label_ids_to_fuse=self.stuff,
            target_sizes=[x.rgb.shape[:2] for x in batch])
        return [hub_maps(r["segmentation"], r["segments_info"], self.labels) for r in results]


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def panoptic_segmenter(config: PanopticSegmenterConfig, space: LabelSpace, device: str) -> Segmenter:
    """The configured panoptic backend."""
    if config.backend == "detectron2":
        return Detectron2Panoptic(config, space, device)
    return HubPanoptic(config, space, device)


# ----------------------------------------------------------------------------- human parts


class HumanSegmenter:
    """SCHP-layout parser; LIP background becomes void, parts become their own regions."""

    role = "human"

    def __init__(self, config: HumanSegmenterConfig, space: LabelSpace, device: str):
        import torch

        from muse.models.human_parser import load_human_parser

        if config.weights is None and not config.allow_random_weights:
            raise ValueError("segmenter 'human' needs segment.human.weights (an SCHP LIP checkpoint path)")
        self.torch, self.device, self.size = torch, device, config.input_size
        self.model = load_human_parser(config.weights).to(device)
        self.lut = np.array([space.human(i) for i in range(len(LIP_CLASSES))], np.uint16)

    def __call__(self, batch: list[SceneInput]) -> list[SegmentMaps]:
        torch = self.torch
        F = torch.nn.functional
        x = torch.stack([torch.from_numpy(s.rgb).permute(2, 0, 1) for s in batch]).float().div(255).to(self.device)
        h, w = x.shape[-2:]
        with torch.no_grad():
            logits = self.model(F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=True))
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
        lip = logits.argmax(1).cpu().numpy()
        return [SegmentMaps(self.lut[m], m.astype(np.int32)) for m in lip]


# ----------------------------------------------------------------------------- face parts


# 68-point (iBUG) landmark indices of each face part, in FACE_PARTS order; brows are drawn as lines.
FACE_PART_POINTS = (
    (tuple(range(17, 22)), tuple(range(22, 27))),  # brows
    (tuple(range(36, 42)), tuple(range(42, 48))),  # eyes
    ((27, 31, 32, 33, 34, 35),),  # nose: bridge top to nostrils
    (tuple(range(48, 60)),),  # outer mouth (lips)
    (tuple(range(60, 68)),),  # inner mouth
)


def rasterize_face_parts(landmarks: list[np.ndarray], shape: tuple[int, int], space: LabelSpace) -> np.ndarray:
    """Label map of the 5 face parts from each face's 68 (x, y) landmarks; later parts paint over earlier."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for points in landmarks:
        pts = np.asarray(points, np.float64)[:, :2]
        width = max(2, int(round((pts[:, 0].max() - pts[:, 0].min()) * 0.04)))
        for part, polygons in enumerate(FACE_PART_POINTS):
            for idx in polygons:
                xy = [tuple(p) for p in pts[list(idx)]]
                if part == 0:
                    draw.line(xy, fill=part + 1, width=width)
                else:
                    draw.polygon(xy, fill=part + 1)
    parts = np.asarray(canvas)
    lut = np.array([0, *(space.face(p) for p in range(5))], np.uint16)
    return lut[parts]


class FaceSegmenter:
    """face-alignment's 2D landmarks, rasterized into parts."""

    role = "face"

    def __init__(self, config: FaceSegmenterConfig, space: LabelSpace, device: str):
        require_extra("face")
        import face_alignment

        self.fa = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, face_detector=config.face_detector
        )
        self.space = space

    def __call__(self, batch: list[SceneInput]) -> list[SegmentMaps]:
        out = []
        for x in batch:
            landmarks = self.fa.get_landmarks_from_image(x.rgb) or []
            labels = rasterize_face_parts(landmarks, x.rgb.shape[:2], self.space)
            out.append(SegmentMaps(labels, labels.astype(np.int32)))
        return out


# ----------------------------------------------------------------------------- which segmenters a run uses


def _hub_weights_local(model: str) -> bool:
    """A checkpoint directory, or a hub id whose weights are already in the local Hugging Face cache."""
    if Path(model).is_dir():
        return (Path(model) / "config.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return any(isinstance(try_to_load_from_cache(model, name), str)
                   for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))
    except ValueError:  # neither a folder nor a valid hub id (a mistyped path)
        return False


def _panoptic_local(c: PanopticSegmenterConfig) -> str | None:
    """None when the panoptic segmenter can run here without fetching anything, else why not."""
    if c.backend == "detectron2":
        try:
            require_extra("panoptic", "detectron2")
        except MissingExtra:
            return "detectron2 is not installed"
        return None if c.weights and Path(c.weights).is_file() else "segment.panoptic.weights is not a local file"
    if _hub_weights_local(c.model):
        return None
    return f"segment.panoptic.model {c.model!r} is neither a local directory nor in the Hugging Face cache"


def available_models(c: SegmentConfig) -> tuple[list[str], str]:
    """The model segmenters `auto` runs on this machine (nothing is downloaded for it), and why not when none."""
    why_not = _panoptic_local(c.panoptic)
    if why_not:
        return [], why_not
    models = ["panoptic"]
    if c.human.weights and Path(c.human.weights).is_file():
        models.append("human")
    try:
        require_extra("face")
        models.append("face")
    except MissingExtra:
        pass
    return models, ""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check(c: SegmentConfig) -> None:
    """Fail before anything runs when an explicitly listed segmenter cannot be built here; loads no model."""
    if isinstance(c.segmenters, str):
        return
    for name in c.segmenters:
        require_extra(name, c.panoptic.backend)
        if name == "human" and c.human.weights is None and not c.human.allow_random_weights:
            raise MissingExtra("segmenter 'human' needs segment.human.weights (an SCHP LIP checkpoint path)")
        if name == "human" and c.human.weights is not None and not Path(c.human.weights).is_file():
            raise MissingExtra(f"segment.human.weights {c.human.weights!r}: no such file")
        if name == "panoptic" and c.panoptic.backend == "transformers" and not _hub_weights_local(c.panoptic.model) \
                and _hub_offline():
            raise MissingExtra(f"segment.panoptic.model {c.panoptic.model!r} is not in the Hugging Face cache and "
                               "HF_HUB_OFFLINE is set: point it at a local checkpoint directory")


def plan(c: SegmentConfig, masks_shipped: bool) -> SceneMaps:
    """The segmenters a run uses for a source that does (or does not) ship COCO-panoptic masks."""
    if c.segmenters == "none":
        return SceneMaps((), "segment.segmenters is none")
    if isinstance(c.segmenters, list):
        return SceneMaps(tuple(c.segmenters), "segment.segmenters lists them")
    if masks_shipped:
        return SceneMaps(("masks",), "auto: the source ships COCO-panoptic masks")
    models, why_not = available_models(c)
    if models:
        return SceneMaps(tuple(models), "auto: the source ships no masks; these models' weights are on this machine")
    return SceneMaps((), f"auto: the source ships no masks and no segmenter model can run here ({why_not})")


def build_segmenter(name: str, config, space: LabelSpace, device: str) -> Segmenter:
    """The segmenter `name` from the stage config (`muse.config.SegmentConfig`)."""
    if name == "masks":
        return MasksSegmenter(config.masks, space)
    if name == "panoptic":
        return panoptic_segmenter(config.panoptic, space, device)
    if name == "human":
        return HumanSegmenter(config.human, space, device)
    if name == "face":
        return FaceSegmenter(config.face, space, device)
    raise ValueError(f"unknown segmenter {name!r}")
