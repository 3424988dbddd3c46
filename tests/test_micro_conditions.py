"""Micro-conditioning and the pooled caption: from the sample's metadata to the parquet to the transformer."""

from __future__ import annotations

import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from muse.datasets.tokens import TokenTable
from muse.micro_conditions import NAMES, fourier, of_sample
from muse.models.transformer import MaskedTransformer, TransformerSpec


def test_a_samples_micro_conditions_come_from_its_metadata():
    wide = {"original_width": 200, "original_height": 100, "source_info": {"aesthetic": 6.25, "nsfw": True}}
    assert of_sample(wide, "source_info.aesthetic") == [200, 100, 0, 50, 6.25]  # shard crops the centre square
    tall = {"original_width": 100, "original_height": 301}
    assert of_sample(tall, None)[:4] == [100, 301, 100, 0] and math.isnan(of_sample(tall, None)[4])
    assert math.isnan(of_sample(wide, "source_info.nsfw")[4])  # a flag is no score
    assert math.isnan(of_sample(wide, "source_info.missing")[4])


def test_the_tokens_carry_each_rows_micro_conditions(pipeline_store):
    _, _, arts = pipeline_store
    files = sorted(arts["tokens"].path.glob("*.parquet"))
    table = pq.read_table(files[0], columns=["micro_conds"])
    assert table.schema.field("micro_conds").type == pa.list_(pa.float32(), len(NAMES))
    rows = TokenTable(arts["tokens"].path, "train", ["micro_conds"])
    micro = rows[0]["micro_conds"]
    assert micro.dtype == torch.float32 and micro[:4].tolist() == [48, 48, 0, 0] and torch.isnan(micro[4])
    assert rows.column("micro_conds", 3).shape == (3, len(NAMES))


def test_unknown_conditions_embed_as_zeros():
    features = fourier(torch.tensor([[3.0, math.nan]]), dim=8)
    assert features.shape == (1, 16) and features[0, 8:].abs().sum() == 0 and features[0, :8].abs().sum() > 0


def _spec(**kw) -> TransformerSpec:
    return TransformerSpec(dim=32, depth=1, heads=2, codebook_size=4, side=2, text_dim=8, **kw)


@pytest.mark.parametrize("conditioned", [True, False])
def test_a_micro_conditioned_transformer_learns_what_the_condition_says(conditioned):
    """Tokens are 1 for a high aesthetic score and 2 for a low one, with no text: a model given the score learns
    that; the same model without micro-conditions (the negative control) cannot beat a coin."""
    torch.manual_seed(0)
    model = MaskedTransformer(_spec(micro_conditions=("aesthetic",) if conditioned else ()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n: int = 64):
        high = torch.rand(n, generator=gen) < 0.5
        micro = torch.full((n, len(NAMES)), 64.0)
        micro[:, 4] = torch.where(high, 8.0, 2.0)
        targets = torch.where(high, 1, 2)[:, None].expand(n, 4)
        memory, mask = model.memory(torch.zeros(n, 3, 8), torch.zeros(n, 3, dtype=torch.bool), None, None, micro)
        logits = model(torch.full((n, 4), model.spec.mask_id), memory, mask)
        return logits, targets

    for _ in range(150):
        logits, targets = batch()
        loss = F.cross_entropy(logits.transpose(1, 2), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits, targets = batch(256)
        accuracy = float((logits.argmax(-1) == targets).float().mean())
    assert accuracy > 0.95 if conditioned else accuracy < 0.65


def test_the_pooled_caption_is_one_memory_token_and_leaves_with_the_text():
    torch.manual_seed(0)
    model = MaskedTransformer(_spec(pooled_text=True)).eval()
    emb = torch.randn(2, 3, 8)
    shown, hidden = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        memory, mask = model.memory(emb, shown)
        plain = MaskedTransformer(_spec()).memory(emb, shown)[0]
        dropped, _ = model.memory(emb, hidden)
    assert memory.shape[1] == plain.shape[1] + 1 and mask[:, -1].all()
    assert not torch.allclose(memory[0, -1], memory[1, -1])  # two captions, two pooled tokens
    assert torch.allclose(dropped[0, -1], dropped[1, -1])  # text dropped: the pooled caption is gone too
    with pytest.raises(ValueError, match="micro-conditioned on \\['crop'\\]: pass micro"):
        MaskedTransformer(_spec(micro_conditions=("crop",))).memory(emb, shown)


def test_train_base_with_micro_conditions_records_the_medians_generation_starts_from(trained_store, tmp_path):
    from muse.artifacts.store import ArtifactStore
    from muse.contracts import TransformerRecord
    from muse.generate import TextToImage
    from muse.stage import execute
    from muse.stages import train_base

    cfg, _, arts = trained_store
    store = ArtifactStore(tmp_path / "store")
    shutil.copytree(arts["vqgan-low"].path, store.root / "vqgan-low" / arts["vqgan-low"].version)
    model = cfg.train_base.model.model_copy(update={"pooled_text": True, "micro_conditions": ["original_size",
                                                                                             "aesthetic"]})
    section = cfg.train_base.model_copy(update={"model": model})
    base = execute(train_base, cfg.model_copy(update={"train_base": section}), {"tokens": arts["tokens"]}, store)
    record = TransformerRecord.of(base.path)
    assert record.spec["micro_conditions"] == ["original_size", "aesthetic"] and record.spec["pooled_text"]
    assert record.micro_defaults == {"original_width": 48, "original_height": 48, "crop_top": 0, "crop_left": 0,
                                     "aesthetic": None}
    pipe = TextToImage(store, device="cpu", pins={"base": base})
    values = pipe.micro_values(pipe.base, {"aesthetic": 6.5})
    assert values[0, :4].tolist() == [48, 48, 0, 0] and values[0, 4] == 6.5
    assert torch.isnan(pipe.micro_values(pipe.base, {})[0, 4])  # no score in the data: unknown
    a, b = (pipe.generate_tokens(["a red circle"], micro={"aesthetic": s}, superres=False)["tokens_low"]
            for s in (1.0, 9.0))
    assert a.shape == b.shape == (1, 16)
