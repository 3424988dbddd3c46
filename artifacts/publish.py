"""Publish an artifact to the Prefect UI: a table (metrics + lineage) and a markdown page (config + inputs).

Called by the flows only; stages stay free of Prefect. Keys follow Prefect's rule
`^[a-z0-9-]*$`: the table is `muse-<kind>`, the page `muse-<kind>-config`, and a
stage's extra tables (manifest `details.tables.NAME`) `muse-<kind>-NAME`.
Images (sample grids) are embedded in the page as data URIs, so they render in
the UI without the store being reachable from the browser.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from .store import PREVIEW_DIR, Artifact, ArtifactStore

_MAX_PREVIEW_BYTES = 2_000_000  # what one page embeds per image; a larger preview is shown scaled down


def _embedded(png: Path) -> tuple[str, str]:
    """A preview as a data URI the UI renders without the store, and a note: PNG as it is when small enough,
    else a JPEG scaled down until it fits, the note naming the full-size file."""
    from PIL import Image

    data = png.read_bytes()
    if len(data) <= _MAX_PREVIEW_BYTES:
        return f"data:image/png;base64,{base64.b64encode(data).decode()}", ""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 1.0
    while True:
        scale *= 0.7
        small = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=85)
        if buf.tell() <= _MAX_PREVIEW_BYTES:
            break
    note = f"shown at {small.width}x{small.height} of {image.width}x{image.height}; full size: `{png}`"
    return f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}", note


def _scalar(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def table_rows(artifact: Artifact, store: ArtifactStore) -> list[dict[str, str]]:
    """Metrics, then identity, then lineage (each upstream artifact once), as field/value rows."""
    m = artifact.manifest
    rows = [{"field": f"metric: {k}", "value": _scalar(v)} for k, v in sorted(m.metrics.items())]
    rows += [
        {"field": "artifact", "value": m.label},
        {"field": "path", "value": str(artifact.path)},
        {"field": "stage", "value": f"{m.stage} (code {m.code_version})"},
        {"field": "files", "value": f"{len(m.files)} files, {sum(f.size for f in m.files):,} bytes"},
    ]
    return rows + [{"field": "lineage", "value": line} for line in store.made_from(artifact)]


def markdown_page(artifact: Artifact) -> str:
    """Config, inputs and previews of an artifact as markdown."""
    m = artifact.manifest
    parts = [f"# {m.label}", f"stage `{m.stage}`; created {m.created:%Y-%m-%d %H:%M:%S} UTC", "## Inputs"]
    parts += [f"- `{kind}:{version}`" for kind, version in sorted(m.inputs.items())] or ["- (none)"]
    previews = sorted((artifact.path / PREVIEW_DIR).glob("*.png")) if (artifact.path / PREVIEW_DIR).is_dir() else []
    for png in previews:
        uri, note = _embedded(png)
        parts += [f"## {png.stem}", f"![{png.stem}]({uri})", *([note] if note else [])]
    parts += ["## Config", "```json", json.dumps(m.config, indent=2), "```"]
    return "\n\n".join(parts)


def publish(artifact: Artifact, store: ArtifactStore) -> None:
    """Create the table and markdown Prefect artifacts for one store artifact this run wrote."""
    key = f"muse-{artifact.kind}"
    create_table_artifact(key=key, table=table_rows(artifact, store), description=artifact.manifest.label)
    create_markdown_artifact(key=f"{key}-config", markdown=markdown_page(artifact), description=artifact.manifest.label)
    # Stage-specific tables (e.g. segment's class frequencies) ride in the manifest's details.
    for name, rows in artifact.manifest.details.get("tables", {}).items():
        create_table_artifact(key=f"{key}-{name}", table=rows, description=f"{artifact.manifest.label}: {name}")


class ProgressArtifacts:
    """A `muse.progress` reporter: one Prefect progress artifact per piece of work a stage reports
    (`muse-<stage>-<name>-progress`, e.g. `muse-train-vqgan-vqgan-low-progress`), updated as it goes."""

    def __init__(self, stage: str):
        self.stage = stage
        self.ids: dict[str, object] = {}

    def __call__(self, name: str, done: int, total: int, eta_seconds: float | None) -> None:
        percent = round(100 * done / max(total, 1), 1)
        description = f"{name}: {done}/{total}" + ("" if eta_seconds is None else f", ETA {eta_seconds:.0f} s")
        if name in self.ids:
            update_progress_artifact(self.ids[name], percent, description=description)
        else:
            key = re.sub(r"[^a-z0-9-]+", "-", f"muse-{self.stage}-{name}-progress".lower())
            self.ids[name] = create_progress_artifact(percent, key=key, description=description)


def publish_reuse(artifact: Artifact) -> None:
    """A keyless note in this run that it reused the artifact: the keyed `muse-<kind>` artifacts (the UI's latest)
    stay those of the run that made it."""
    m = artifact.manifest
    create_markdown_artifact(markdown=f"Reused `{m.label}`, made by stage `{m.stage}` on "
                                      f"{m.created:%Y-%m-%d %H:%M:%S} UTC (its page: `muse-{m.kind}-config`).",
                             description=f"reused {m.label}")
