"""The `muse` command line: run the pipeline, inspect config and artifacts, serve deployments.

Heavy imports (Prefect, torch) happen inside the commands that need them, so
`muse --help` and `muse config show` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys

from muse.config import ConfigError, dump_config, gpu_workers, load_config, preset_names
from muse.errors import UserError


SHOWN_TABLE_ROWS = 12  # `artifacts show` prints a table of up to this many rows; longer ones are counted


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="DIR", help="artifact store: a folder or an fsspec URL such as s3://bucket/muse "
                   "(default: $MUSE_STORE or ./store)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"config preset: {', '.join(preset_names())} (default: tiny)")
    p.add_argument("--config", metavar="FILE", help="YAML file merged over the preset")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one key, e.g. --set train_base.train.steps=100 (repeatable)")
    p.add_argument("--gpus", type=int, metavar="N", help="train every training stage data-parallel on N GPUs "
                   "(Ray Train workers, one GPU each; --set workers keys still win)")


def _sampling_args(p: argparse.ArgumentParser, steps_flag: str = "--steps") -> None:
    """Sampler flags; each defaults to the setting the trained transformers recorded (`sampling` in config)."""
    trained = " (default: what the model was trained with)"
    p.add_argument(steps_flag, type=int, dest="steps", help="base sampling steps" + trained)
    p.add_argument("--superres-steps", type=int, help="super-res sampling steps" + trained)
    p.add_argument("--guidance-scale", type=float, help="final CFG scale t of the base pass" + trained)
    p.add_argument("--superres-guidance-scale", type=float, help="final CFG scale of the super-res pass" + trained)
    p.add_argument("--guidance-schedule", choices=["linear", "constant"], help="CFG scale over the steps, both passes")
    p.add_argument("--temperature", type=float, help="token sampling temperature (annealed to 0), both passes")
    p.add_argument("--confidence-temperature", type=float, help="randomness of which tokens are kept, both passes")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens, both passes")
    p.add_argument("--order", choices=["confidence", "halton"], help="which tokens each step keeps: the most "
                   "confident, or the next of a Halton sequence over the grid; both passes")
    p.add_argument("--guide-scale", type=float, help="mid-layer guidance of the base pass by the trained guide; "
                   "0 = off, negative steers away" + trained)
    p.add_argument("--guide-label", help="with a guide trained on labels: the class steered towards")
    p.add_argument("--micro", metavar="NAME=VALUE", action="append", default=[],
                   help="a micro-condition for models trained with them, e.g. aesthetic=6.5 or original_width=1024 "
                        "(repeatable; default: the training rows' medians)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-superres", action="store_true", help="decode the base tokens with vqgan-low")


def _embedding_args(p: argparse.ArgumentParser, out: str, steps_flag: str = "--steps") -> None:
    """Flags of the commands that generate from CLIP image embeddings (vary, interpolate)."""
    p.add_argument("--prompt", default="", help="a caption to add to the embeddings (default: none)")
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    _sampling_args(p, steps_flag)
    _store_arg(p)


def _sampling(pipe, args: argparse.Namespace):
    """The pipeline's sampler settings (the trained ones) with the given flags applied."""
    from pydantic import ValidationError

    from muse.config import SamplerConfig, SamplingConfig

    both = {k: getattr(args, k) for k in ("guidance_schedule", "temperature", "confidence_temperature", "top_k",
                                          "order") if getattr(args, k) is not None}

    def apply(current: SamplerConfig, steps, scale) -> SamplerConfig:
        update = both | {k: v for k, v in (("steps", steps), ("guidance_scale", scale)) if v is not None}
        try:
            return SamplerConfig.model_validate(current.model_dump() | update)
        except ValidationError as e:
            raise ConfigError(f"sampler flags: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None

    s = pipe.sampling
    guide = {k: v for k, v in (("scale", args.guide_scale), ("label", args.guide_label)) if v is not None}
    micro = {}
    for item in args.micro:
        name, _, value = item.partition("=")
        try:
            micro[name] = float(value)
        except ValueError:
            raise ConfigError(f"--micro {item!r}: expected NAME=NUMBER") from None
    try:
        return SamplingConfig(base=apply(s.base, args.steps, args.guidance_scale),
                              superres=apply(s.superres, args.superres_steps, args.superres_guidance_scale),
                              guide=s.guide.model_copy(update=guide), micro=s.micro | micro)
    except ValidationError as e:
        raise ConfigError(f"--micro: {e.errors()[0]['loc'][-1]!r}: {e.errors()[0]['msg']}") from None


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{flag} {item!r}: expected KIND=VERSION")
        out[key] = value
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from muse.flows.dag import STAGES, TARGETS, preflight, stages_for

    if args.target not in TARGETS:
        raise ConfigError(f"unknown target {args.target!r}; choose one of: {', '.join(TARGETS)}")
    for name in args.force:
        if name not in STAGES:
            raise ConfigError(f"--force {name!r}: unknown stage; choose from {', '.join(STAGES)}")
    pinned = _pairs(args.inputs, "--input")
    # Fail fast, before Prefect starts: the config, then what the stages can check up front (the flow checks again).
    config = load_config(args.preset, args.config, args.overrides)
    preflight(stages_for(args.target, config), config)

    from prefect.exceptions import FailedRun

    from muse.flows.pipeline import muse

    try:
        produced = muse(
            target=args.target, preset=args.preset, overrides=args.overrides, config_file=args.config,
            source=args.source, force=args.force, store=args.store, inputs=pinned,
        )
    except FailedRun as e:  # the run ended on a user's mistake, already one line
        raise UserError(str(e)) from None
    for kind, version in produced.items():
        print(f"{kind}:{version}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.preset, args.config, args.overrides)), end="")
    return 0


def _store(args: argparse.Namespace):
    from muse.artifacts.remote import open_store

    return open_store(args.store)


def cmd_artifacts_ls(args: argparse.Namespace) -> int:
    store = _store(args)
    arts = store.list(args.kind)
    if not arts:
        print(f"no artifacts{' of kind ' + args.kind if args.kind else ''} in {store.location}")
        return 0
    print(f"{'KIND':<18} {'SEQ':>4}  {'VERSION':<12}  {'CREATED':<19}  {'FILES':>5} {'BYTES':>13}  STAGE")
    for a in arts:
        m = a.manifest
        mark = "*" if store.latest_version(a.kind) == a.version else " "
        print(f"{m.kind:<18} {'v' + str(m.seq):>4}{mark} {m.version:<12}  {m.created:%Y-%m-%d %H:%M:%S}  "
              f"{len(m.files):>5} {sum(f.size for f in m.files):>13,}  {m.stage}")
    print("(* = latest)")
    return 0


def cmd_artifacts_show(args: argparse.Namespace) -> int:
    """A summary that fits a screen (metrics, inputs, files in a line); the rest behind flags."""
    store = _store(args)
    art = store.resolve(args.ref)
    m = art.manifest
    if args.json:
        print(m.model_dump_json(indent=2))
        return 0
    print(f"{m.label}  [{m.stage}, code {m.code_version}]  created {m.created:%Y-%m-%d %H:%M:%S} UTC\npath: {art.path}")
    print("inputs: " + (", ".join(f"{k}:{v}" for k, v in sorted(m.inputs.items())) or "none"))
    print("metrics:")
    for k, v in m.metrics.items():
        print(f"  {k}: {v}")
    for name, rows in m.details.get("tables", {}).items():  # small tables inline (the report's by-link table)
        if len(rows) <= SHOWN_TABLE_ROWS:
            print(f"{name}:")
            for row in rows:
                print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
        else:
            print(f"{name}: {len(rows)} rows (--json)")
    print(f"files: {len(m.files)}, {sum(f.size for f in m.files):,} bytes")
    if args.files:
        for f in m.files:
            print(f"  {f.size:>12,}  {f.sha256[:16]}  {f.path}")
    if args.lineage:
        print("lineage:")
        for line in store.lineage(art):
            print("  " + line)
    if args.config:
        print("config:")
        print("  " + json.dumps(m.config, indent=2).replace("\n", "\n  "))
    shown = [flag for flag, on in (("--files", args.files), ("--lineage", args.lineage), ("--config", args.config))
             if not on]
    if shown:
        print(f"(more: {' '.join(shown)}, or --json for the whole manifest)")
    return 0


def cmd_artifacts_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    checked, problems = store.verify(args.kind)
    for p in problems:
        print(f"BAD {p}")
    print(f"verified {checked} files in {len(store.list(args.kind))} artifacts: {len(problems)} problems")
    return 1 if problems else 0


def cmd_artifacts_gc(args: argparse.Namespace) -> int:
    store = _store(args)
    removed = store.gc()
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} leftovers removed from {store.location} (killed commits, scratch of committed versions)")
    return 0


def _prompts(args: argparse.Namespace) -> list[dict]:
    """Positional prompts (numbered) or a JSONL file of {id, prompt[, negative, seed]}; errors name file and line."""
    if bool(args.prompts) == bool(args.prompts_file):
        raise ConfigError("give prompts as arguments or with --prompts FILE.jsonl (one of the two)")
    if args.prompts:
        return [{"id": f"{i:04d}", "prompt": p} for i, p in enumerate(args.prompts)]
    items = []
    with open(args.prompts_file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{args.prompts_file}:{n}: not JSON ({e.msg})") from e
            for field in ("id", "prompt"):
                if not isinstance(item.get(field), str) or not item[field]:
                    raise ConfigError(f"{args.prompts_file}:{n}: field {field!r} must be a non-empty string")
            if "/" in item["id"] or item["id"].startswith("."):
                raise ConfigError(f"{args.prompts_file}:{n}: field 'id' must be a plain file name")
            items.append(item)
    return items


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from muse.generate import TextToImage

    items = _prompts(args)
    pipe = TextToImage.from_store(_store(args))
    scene = _scene(pipe, args.scene, args.scene_edges) if args.scene else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sampling = _sampling(pipe, args)
    groups: dict[tuple, list[dict]] = {}  # prompts sharing a seed and a negative prompt go in one batch
    for item in items:
        groups.setdefault((item.get("seed", args.seed), item.get("negative", args.negative)), []).append(item)
    for (seed, negative), group in groups.items():
        for i in range(0, len(group), args.batch_size):
            batch = group[i:i + args.batch_size]
            prompts = [b["prompt"] for b in batch]
            images = pipe(prompts, negative=None if negative is None else [negative] * len(batch), sampling=sampling,
                          seed=seed + i, superres=not args.no_superres, scene=scene, prior=args.prior)
            for b, img in zip(batch, images):
                img.save(out / f"{b['id']}.png")
                print(out / f"{b['id']}.png")
    print(f"lineage: {json.dumps(pipe.lineage, sort_keys=True)}", file=sys.stderr)
    return 0


def cmd_vary(args: argparse.Namespace) -> int:
    from muse.generate import TextToImage

    pipe = TextToImage.from_store(_store(args))
    _write_numbered(pipe.vary(_open_image(args.image), n=args.n, prompt=args.prompt, seed=args.seed,
                              sampling=_sampling(pipe, args), superres=not args.no_superres), args.out)
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from muse.generate import TextToImage

    pipe = TextToImage.from_store(_store(args))
    _write_numbered(pipe.interpolate(_open_image(args.image_a), _open_image(args.image_b), steps=args.frames,
                                     prompt=args.prompt, seed=args.seed, sampling=_sampling(pipe, args),
                                     superres=not args.no_superres), args.out)
    return 0


def _write_numbered(images: list, folder: str) -> None:
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(out / f"{i:04d}.png")
        print(out / f"{i:04d}.png")


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def _scene(pipe, labels_path: str, edges_path: str | None):
    """Scene tokens from a label-map PNG (label-space ids, as the segments artifact writes them)."""
    import numpy as np
    from PIL import Image

    from muse.editing import scene_tokens

    if pipe.vq_seg is None:
        raise ConfigError("--scene: this base model was trained without scene tokens "
                          "(set train_base.scene_conditioning: true and retrain)")
    labels = np.asarray(Image.open(labels_path)).astype(np.int64)
    if labels.ndim != 2:
        raise ConfigError(f"{labels_path}: a label map must be a one-channel PNG of label ids, got shape {labels.shape}")
    edges = np.asarray(Image.open(edges_path).convert("L")) > 127 if edges_path else None
    try:
        return scene_tokens(pipe.vq_seg, labels, edges)
    except ValueError as e:
        raise ConfigError(f"{labels_path}: {e}") from e


def cmd_edit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image

    from muse.editing import edit_tokens, outpaint_canvas
    from muse.generate import TextToImage, to_images

    text_diff = args.from_caption is not None or args.to_caption is not None
    modes = sum([args.mask is not None, args.outpaint is not None, args.no_mask, args.strength is not None, text_diff])
    if modes != 1:
        raise ConfigError("choose one edit: --mask MASK.png (inpaint), --outpaint FRACTION, --strength S (img2img), "
                          "--no-mask, or --from OLD --to NEW (a text-diff edit)")
    if text_diff:
        if args.from_caption is None or args.to_caption is None:
            raise ConfigError("a text-diff edit needs both --from OLD and --to NEW")
        pipe = TextToImage.from_store(_store(args))
        edited = pipe.text_diff(_open_image(args.image), args.from_caption, args.to_caption, args.amount,
                                prompt=args.prompt or "", seed=args.seed, sampling=_sampling(pipe, args),
                                superres=not args.no_superres)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        edited.save(args.out)
        print(args.out)
        return 0
    if args.prompt is None:
        raise ConfigError("--prompt is needed: what the edited image shows")
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise ConfigError(f"--strength {args.strength}: must be in [0, 1] (0 keeps the image, 1 generates anew)")
    image = Image.open(args.image)
    mask = Image.open(args.mask) if args.mask else None
    if mask is not None and mask.size != image.size:
        raise ConfigError(f"{args.mask}: mask is {mask.size[0]}x{mask.size[1]}, image {args.image} is "
                          f"{image.size[0]}x{image.size[1]}")
    if args.outpaint is not None:
        try:
            image, mask = outpaint_canvas(image, args.outpaint, args.outpaint_side)
        except ValueError as e:
            raise ConfigError(f"--outpaint: {e}") from e
    pipe = TextToImage.from_store(_store(args))
    tokens = edit_tokens(pipe, image, args.prompt, mask, negative=args.negative, sampling=_sampling(pipe, args),
                         seed=args.seed, superres=not args.no_superres, mask_free_iterations=args.iterations,
                         mask_free_fraction=args.edit_fraction, strength=args.strength)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_images(pipe.decode_tokens(tokens))[0].save(out)
    changed = int((tokens["tokens_low"] != tokens["original_low"]).sum())
    print(out)
    print(f"base tokens changed: {changed}/{tokens['tokens_low'].numel()}; "
          f"lineage: {json.dumps(pipe.lineage, sort_keys=True)}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from muse.export import export, push_to_hub

    out = export(_store(args), args.ref, args.out)
    print(out)
    if args.push_to_hub:
        print(push_to_hub(out, args.push_to_hub))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from muse.flows.deployments import serve

    serve(store=args.store, preset=args.preset, sources=tuple(args.allow_source), overrides=tuple(args.allow_set))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse", description="Train Muse-style text-to-image models end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline or one stage in this process (a temporary embedded Prefect "
                       "API unless PREFECT_API_URL names a server)",
                       description="Run TARGET: full-train or one stage (its inputs come from the store).")
    p.add_argument("target", metavar="TARGET", help="full-train, shard, segment, train-vqgan, tokenize, "
                   "train-base, train-superres, train-guide, finetune-decoder or evaluate")
    _config_args(p)
    _store_arg(p)
    p.add_argument("--source", help="data for the shard stage: folder, metadata file, tar pattern (default: demo)")
    p.add_argument("--force", metavar="STAGE", action="append", default=[], help="rerun STAGE even if up to date")
    p.add_argument("--input", metavar="KIND=VERSION", action="append", default=[], dest="inputs",
                   help="use this version of an input artifact instead of latest (repeatable)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="inspect configuration")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = csub.add_parser("show", help="print the resolved config as YAML")
    _config_args(p)
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("artifacts", help="list, show and verify stored artifacts")
    asub = p.add_subparsers(dest="artifacts_command", required=True, metavar="ACTION")
    p = asub.add_parser("ls", help="list artifacts by kind, oldest first within a kind")
    p.add_argument("kind", nargs="?", help="only this kind")
    _store_arg(p)
    p.set_defaults(func=cmd_artifacts_ls)
    p = asub.add_parser("show", help="summary of KIND[:VERSION|:vN]: metrics, inputs, files")
    p.add_argument("ref", metavar="KIND[:VERSION]")
    p.add_argument("--files", action="store_true", help="list every file with its size and sha256")
    p.add_argument("--lineage", action="store_true", help="the artifacts it was made from, down to the data")
    p.add_argument("--config", action="store_true", help="the config its version hashes")
    p.add_argument("--json", action="store_true", help="the whole manifest as JSON (details included)")
    _store_arg(p)
    p.set_defaults(func=cmd_artifacts_show)
    p = asub.add_parser("verify", help="re-hash every file; exit 1 and name the bad files on mismatch")
    p.add_argument("kind", nargs="?", help="only this kind")
    _store_arg(p)
    p.set_defaults(func=cmd_artifacts_verify)
    p = asub.add_parser("gc", help="remove what killed runs left: .tmp/ of dead commits, .work/ of committed versions")
    _store_arg(p)
    p.set_defaults(func=cmd_artifacts_gc)

    p = sub.add_parser("generate", help="text -> images with the trained base, super-res and decoder artifacts")
    p.add_argument("prompts", nargs="*", help="prompts (written as OUT/0000.png, 0001.png, ...)")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE.jsonl",
                   help="one JSON object a line: id, prompt, optional negative and seed; writes OUT/<id>.png")
    p.add_argument("--negative", help="negative prompt (replaces the unconditional logits)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    _sampling_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scene", metavar="LABELMAP.png", help="lay out the images by a label map (one-channel PNG of "
                   "label-space ids); needs a base model trained with train_base.scene_conditioning")
    p.add_argument("--scene-edges", metavar="EDGES.png", help="edge map for --scene (default: the label boundaries)")
    p.add_argument("--prior", action="store_true", help="unCLIP: condition on the prior's CLIP image embedding of "
                   "each prompt too (a base trained with train_base.image_conditioning, and train-prior)")
    _store_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("vary", help="variations of an image from its CLIP embedding (a base trained with "
                       "train_base.image_conditioning)")
    p.add_argument("image", help="the image to vary")
    p.add_argument("--n", type=int, default=4, help="variations (default 4)")
    _embedding_args(p, "variations")
    p.set_defaults(func=cmd_vary)

    p = sub.add_parser("interpolate", help="images along the path between two images' CLIP embeddings")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--steps", type=int, default=5, dest="frames",
                   help="images from A to B, both ends included (default 5)")
    _embedding_args(p, "interpolation", steps_flag="--sampling-steps")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("edit", help="edit an image under a prompt: inpaint a mask, outpaint a margin, img2img, "
                       "or mask-free",
                       description="Resample some of IMAGE's tokens under PROMPT; the rest stay the image's own.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--prompt", help="what the edited image shows (needed by every edit but a text diff)")
    p.add_argument("--from", dest="from_caption", metavar="OLD", help="text-diff edit (DALL-E 2 3.3): a caption of "
                   "the image as it is; needs --to and a base trained with train_base.image_conditioning")
    p.add_argument("--to", dest="to_caption", metavar="NEW", help="text-diff edit: the caption it should match")
    p.add_argument("--amount", type=float, default=0.5, help="text-diff edit: how far the image embedding turns "
                   "towards the captions' difference (0 keeps it; default 0.5)")
    p.add_argument("--mask", metavar="MASK.png", help="inpaint: white pixels (> 127) are regenerated")
    p.add_argument("--outpaint", type=float, metavar="FRACTION",
                   help="outpaint: shrink the image by FRACTION and generate the new margin")
    p.add_argument("--outpaint-side", default="all", choices=["all", "left", "right", "top", "bottom"],
                   help="where the new margin goes (default: all around)")
    p.add_argument("--strength", type=float, metavar="S",
                   help="img2img: re-mask a share S in [0, 1] of the schedule's tokens and decode from there "
                        "(0 returns the image's own tokens, 1 generates anew)")
    p.add_argument("--no-mask", action="store_true",
                   help="mask-free: repeatedly resample the tokens least likely under the prompt")
    p.add_argument("--iterations", type=int, default=6, help="mask-free rounds (default 6)")
    p.add_argument("--edit-fraction", type=float, default=0.15,
                   help="mask-free: share of base tokens resampled per round (default 0.15)")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--out", default="edited.png", help="output PNG (default: edited.png)")
    _sampling_args(p)
    _store_arg(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("export", help="write a trained model as a folder others load without the store: weights, "
                       "config, model card", description="Write KIND[:VERSION] as safetensors weights, config.json, "
                       "muse.json and a model card README.md; load it back with muse.from_pretrained(DIR).")
    p.add_argument("ref", metavar="KIND[:VERSION]", help="base, superres, guide, vqgan-low, vqgan-high, vqseg or "
                   "decoder, optionally :VERSION or :vN (default: latest)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hugging Face Hub repo "
                   "(needs huggingface_hub and a token)")
    _store_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="register and serve deployments muse/full-train and muse/<stage> "
                       "(needs a Prefect API server; see infra/)")
    p.add_argument("--preset", default="tiny", help="default preset of the deployments' runs")
    p.add_argument("--allow-source", metavar="DIR", action="append", default=[],
                   help="a folder runs may read a source from (repeatable; default: the demo data only)")
    p.add_argument("--allow-set", metavar="KEY", action="append", default=[],
                   help="a config key (or section prefix, e.g. train_base.train) runs may override (repeatable; "
                   "default: none)")
    _store_arg(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from muse.artifacts.store import ArtifactError

    try:
        if getattr(args, "gpus", None) is not None:
            args.overrides = gpu_workers(args.gpus) + args.overrides
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (UserError, ArtifactError, NotImplementedError, RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
