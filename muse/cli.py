"""The `muse` command line: run the pipeline, inspect config and artifacts, serve deployments.

Heavy imports (Prefect, torch) happen inside the commands that need them, so
`muse --help` and `muse config show` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys

from muse.config import ConfigError, dump_config, load_config, preset_names


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="DIR", help="artifact store: a folder or an fsspec URL such as s3://bucket/muse "
                   "(default: $MUSE_STORE or ./store)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"config preset: {', '.join(preset_names())} (default: tiny)")
    p.add_argument("--config", metavar="FILE", help="YAML file merged over the preset")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one key, e.g. --set train_base.train.steps=100 (repeatable)")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{flag} {item!r}: expected KIND=VERSION")
        out[key] = value
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from muse.flows.dag import STAGES, TARGETS

    if args.target not in TARGETS:
        raise ConfigError(f"unknown target {args.target!r}; choose one of: {', '.join(TARGETS)}")
    for name in args.force:
        if name not in STAGES:
            raise ConfigError(f"--force {name!r}: unknown stage; choose from {', '.join(STAGES)}")
    pinned = _pairs(args.inputs, "--input")
    load_config(args.preset, args.config, args.overrides)  # fail fast, before Prefect starts

    from muse.flows.pipeline import muse

    produced = muse(
        target=args.target, preset=args.preset, overrides=args.overrides, config_file=args.config,
        source=args.source, force=args.force, store=args.store, inputs=pinned,
    )
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
    store = _store(args)
    art = store.resolve(args.ref)
    m = art.manifest
    print(f"{m.label}\npath:    {art.path}\nstage:   {m.stage} (code {m.code_version})\ncreated: {m.created}")
    print("lineage:")
    for line in store.lineage(art):
        print("  " + line)
    print("metrics:")
    for k, v in m.metrics.items():
        print(f"  {k}: {v}")
    print(f"files ({len(m.files)}):")
    for f in m.files:
        print(f"  {f.size:>12,}  {f.sha256[:16]}  {f.path}")
    print("config:")
    print("  " + json.dumps(m.config, indent=2).replace("\n", "\n  "))
    if m.details:
        print("details:")
        print("  " + json.dumps(m.details, indent=2, default=str).replace("\n", "\n  "))
    return 0


def cmd_artifacts_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    checked, problems = store.verify(args.kind)
    for p in problems:
        print(f"BAD {p}")
    print(f"verified {checked} files in {len(store.list(args.kind))} artifacts: {len(problems)} problems")
    return 1 if problems else 0


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

    from muse.generate import Pipeline

    items = _prompts(args)
    pipe = Pipeline.from_store(_store(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[dict]] = {}  # prompts sharing a seed and a negative prompt go in one batch
    for item in items:
        groups.setdefault((item.get("seed", args.seed), item.get("negative", args.negative)), []).append(item)
    for (seed, negative), group in groups.items():
        for i in range(0, len(group), args.batch_size):
            batch = group[i:i + args.batch_size]
            prompts = [b["prompt"] for b in batch]
            images = pipe(prompts, negative=None if negative is None else [negative] * len(batch), steps=args.steps,
                          superres_steps=args.superres_steps, guidance_scale=args.guidance_scale, seed=seed + i,
                          superres=not args.no_superres)
            for b, img in zip(batch, images):
                img.save(out / f"{b['id']}.png")
                print(out / f"{b['id']}.png")
    print(f"lineage: {json.dumps(pipe.lineage, sort_keys=True)}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from muse.flows.deployments import serve

    serve(store=args.store, preset=args.preset)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse", description="Train Muse-style text-to-image models end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline or one stage in-process (ephemeral Prefect, no server)",
                       description="Run TARGET: full-train or one stage (its inputs come from the store).")
    p.add_argument("target", metavar="TARGET", help="full-train, shard, segment, train-vqgan, tokenize, "
                   "train-base, train-superres, finetune-decoder or evaluate")
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
    p = asub.add_parser("ls", help="list artifacts, oldest first")
    p.add_argument("kind", nargs="?", help="only this kind")
    _store_arg(p)
    p.set_defaults(func=cmd_artifacts_ls)
    p = asub.add_parser("show", help="manifest and lineage of KIND[:VERSION|:vN]")
    p.add_argument("ref", metavar="KIND[:VERSION]")
    _store_arg(p)
    p.set_defaults(func=cmd_artifacts_show)
    p = asub.add_parser("verify", help="re-hash every file; exit 1 and name the bad files on mismatch")
    p.add_argument("kind", nargs="?", help="only this kind")
    _store_arg(p)
    p.set_defaults(func=cmd_artifacts_verify)

    p = sub.add_parser("generate", help="text -> images with the trained base, super-res and decoder artifacts")
    p.add_argument("prompts", nargs="*", help="prompts (written as OUT/0000.png, 0001.png, ...)")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE.jsonl",
                   help="one JSON object a line: id, prompt, optional negative and seed; writes OUT/<id>.png")
    p.add_argument("--negative", help="negative prompt (replaces the unconditional logits)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--steps", type=int, default=24, help="base sampling steps (default 24)")
    p.add_argument("--superres-steps", type=int, default=8, help="super-res sampling steps (default 8)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="final CFG scale t (default 3.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-superres", action="store_true", help="decode the base tokens with vqgan-low")
    _store_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="register and serve deployments muse/full-train and muse/<stage> "
                       "(needs a Prefect API server; see infra/)")
    p.add_argument("--preset", default="tiny", help="default preset of the deployments' runs")
    _store_arg(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from muse.artifacts.store import ArtifactError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ArtifactError, NotImplementedError, RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
