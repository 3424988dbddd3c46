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
