"""What the Prefect UI pages show: previews embedded whatever their size."""

import base64
import re

import numpy as np
from PIL import Image

from muse.artifacts.publish import _MAX_PREVIEW_BYTES, markdown_page
from muse.artifacts.store import PREVIEW_DIR, ArtifactStore


def test_a_preview_too_large_to_embed_is_shown_scaled_down_not_as_a_path(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    with store.create("report", stage="evaluate", config={}, inputs={}, code_version="1") as out:
        (out.path / PREVIEW_DIR).mkdir()
        noise = rng.integers(0, 256, (1100, 1100, 3), dtype=np.uint8)  # incompressible: ~3.6 MB as PNG
        Image.fromarray(noise).save(out.path / PREVIEW_DIR / "samples.png")
        Image.fromarray(noise[:64, :64]).save(out.path / PREVIEW_DIR / "small.png")
    art = out.artifact
    assert (art.path / PREVIEW_DIR / "samples.png").stat().st_size > _MAX_PREVIEW_BYTES
    page = markdown_page(art)
    uris = dict(re.findall(r"!\[(\w+)\]\(data:image/(\w+);base64,", page))
    assert uris == {"samples": "jpeg", "small": "png"}  # the small one as it is
    payload = re.search(r"!\[samples\]\(data:image/jpeg;base64,([^)]+)\)", page)[1]
    assert len(base64.b64decode(payload)) <= _MAX_PREVIEW_BYTES
    assert "of 1100x1100; full size:" in page and "too large" not in page


def test_the_ui_table_names_each_upstream_artifact_once(tmp_path):
    from muse.artifacts.publish import table_rows

    store = ArtifactStore(tmp_path / "store")

    def make(kind, inputs):
        with store.create(kind, stage=kind, config={}, inputs={k: a.version for k, a in inputs.items()},
                          code_version="1") as out:
            out.metrics = {"figure": 1}
        return out.artifact

    shards = make("shards", {})
    tokens = make("tokens", {"shards": shards})
    base = make("base", {"tokens": tokens})
    report = make("report", {"shards": shards, "tokens": tokens, "base": base})
    rows = table_rows(report, store)
    assert rows[0] == {"field": "metric: figure", "value": "1"}
    lineage = [r["value"] for r in rows if r["field"] == "lineage"]
    assert lineage == [f"base v1 ({base.version}) [base] from tokens",
                       f"shards v1 ({shards.version}) [shards] from the source",
                       f"tokens v1 ({tokens.version}) [tokens] from shards"]  # each once, nearest first
