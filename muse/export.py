"""Hub-style export: one trained model as a folder others load without the store.

`muse export KIND[:VERSION] --out DIR` writes the artifact's `model.safetensors` and
`config.json` as they are (plain `safetensors` reads the weights), `muse.json` (what the model
is, where it came from, its metrics) and a model card `README.md` in the Hugging Face Hub's
format: lineage down to the data, the data's fingerprint, metrics and a sample grid.
`muse.from_pretrained(DIR)` builds the model back; `push_to_hub` uploads the folder. A LoRA
artifact exports its adapters as they are (peft's files) beside the full weights they make,
merged into its base, so the folder needs no store either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from muse.artifacts.store import PREVIEW_DIR, Artifact, ArtifactStore
from muse.contracts import TransformerRecord, metric
from muse.errors import UserError
from muse.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter, load_trained
from muse.models.saved import CONFIG_FILE, WEIGHTS_FILE, save_weights

EXPORT_FILE = "muse.json"
SAMPLE_FILE = "sample.png"

# What each exportable kind is, for the model card.
DESCRIPTIONS = {
    "base": "the base masked generative transformer (text -> low-res VQ tokens)",
    "superres": "the super-res masked transformer (text + low-res tokens -> high-res tokens)",
    "guide": "a mid-layer guide head for the base transformer",
    "vqgan-low": "the low-res image tokenizer (VQGAN)",
    "vqgan-high": "the high-res image tokenizer (VQGAN)",
    "vqseg": "the scene-map tokenizer",
    "decoder": "the finetuned decoder for the high-res tokenizer's codes",
}


class ExportError(UserError, ValueError):
    """The artifact cannot be exported there; the message says why in one line."""


def export(store: ArtifactStore, ref: str, out: Path) -> Path:
    """Write artifact `ref` (`KIND`, `KIND:VERSION`, `KIND:vN`) as a loadable folder `out`; returns `out`."""
    artifact = store.resolve(ref)
    kind = artifact.kind
    if kind not in DESCRIPTIONS:
        raise ExportError(f"{artifact.ref}: only trained models export ({', '.join(DESCRIPTIONS)}), not {kind!r}")
    adapter = is_adapter(artifact.path)
    if not adapter and not (artifact.path / WEIGHTS_FILE).is_file():
        raise ExportError(f"{artifact.ref}: has no {WEIGHTS_FILE} (a tokenizer that was not trained)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; choose another --out (nothing there is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    if adapter:
        save_weights(load_trained(store, artifact), out, json.loads((artifact.path / CONFIG_FILE).read_text()))
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copy(artifact.path / name, out / name)
    else:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copy(artifact.path / name, out / name)
    previews = sorted((artifact.path / PREVIEW_DIR).glob("*.png")) if (artifact.path / PREVIEW_DIR).is_dir() else []
    if previews:
        shutil.copy(previews[-1], out / SAMPLE_FILE)  # the last checkpoint's grid, or the stage's one preview
    m = artifact.manifest
    from muse import __version__

    record = {"kind": kind, "version": m.version, "label": m.label, "stage": m.stage, "code_version": m.code_version,
              "inputs": m.inputs, "made_from": store.made_from(artifact), "metrics": m.metrics,
              "data": _data(store, artifact), "muse_pipeline": __version__,
              "adapter_of": TransformerRecord.of(artifact.path).adapter_of if adapter else None}
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=2, default=str))
    (out / "README.md").write_text(model_card(record, has_sample=bool(previews)))
    return out


def _data(store: ArtifactStore, artifact: Artifact) -> dict:
    """The shards the model was trained from, with the source fingerprint their version hashes."""
    for kind, version, m in store.upstream(artifact):
        if kind == "shards" and m is not None:
            shards = store.get(kind, version)
            return {"shards": f"shards:{version}", "source_fingerprint": m.config["source_fingerprint"],
                    "samples": metric(shards, "written")}
    return {}


def model_card(record: dict, has_sample: bool) -> str:
    """The folder's README.md: Hub front matter, what the model is, how to load it, lineage, data, metrics."""
    metrics = [f"| {k} | {v} |" for k, v in sorted(record["metrics"].items()) if not isinstance(v, (dict, list))]
    data = record["data"]
    lines = [
        "---", "library_name: muse-pipeline", "tags:", "- text-to-image", "- muse", "- masked-generative-transformer",
        "---", "", f"# {record['label']}", "", f"{DESCRIPTIONS[record['kind']]}, trained by muse-pipeline's "
        f"`{record['stage']}` stage (code version {record['code_version']}).", "",
        *([(f"LoRA adapters trained on `{record['adapter_of']}`: `{WEIGHTS_FILE}` holds them merged into its "
            f"weights, `{ADAPTER_WEIGHTS}` and `{ADAPTER_CONFIG}` the adapters alone (peft's format)."), ""]
          if record["adapter_of"] else []),
        "## Load", "", "```python",
        "import muse", "", 'model = muse.from_pretrained("THIS_FOLDER")', "", "# or the weights alone:",
        "from safetensors.torch import load_file", "", f'state_dict = load_file("THIS_FOLDER/{WEIGHTS_FILE}")',
        "```", "", "## Lineage", "", *[f"- {line}" for line in record["made_from"]], "",
        "## Data", "",
        *([f"- {data['shards']}: {data['samples']} samples; source fingerprint `{data['source_fingerprint']}`"]
          if data else ["- (the shards are not in the exporting store)"]), "",
        "## Metrics", "", "| metric | value |", "|---|---|", *metrics, "",
    ]
    if has_sample:
        lines += ["## Samples", "", f"![samples]({SAMPLE_FILE})", ""]
    return "\n".join(lines)


def load(directory) -> nn.Module:
    """The model of an exported folder, built from its config and weights."""
    directory = Path(directory)
    try:
        kind = json.loads((directory / EXPORT_FILE).read_text())["kind"]
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{directory / EXPORT_FILE}: not a muse export ({e})") from None
    if kind in ("base", "superres"):
        from muse.models.transformer import load_transformer

        return load_transformer(directory)[0]
    if kind == "guide":
        from muse.models.guide import load_guide

        return load_guide(directory)[0]
    if kind == "decoder":
        from muse.models.vqgan import load_decoder

        return load_decoder(directory)
    from muse.models.vqgan import from_pretrained

    return from_pretrained(directory)


def push_to_hub(directory: Path, repo: str) -> str:
    """Upload an exported folder to the Hub repo `repo` (created if missing); returns its URL."""
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise ExportError("--push-to-hub needs huggingface_hub (pip install huggingface_hub)") from None
    if get_token() is None:
        raise ExportError("--push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    api = HfApi()
    url = api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo)
    return str(url)
