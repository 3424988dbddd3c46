"""Super-res's own codes for training images: what a finetuned decoder is given in generation.

In generation the decoder never sees the high-res tokenizer's codes of a real image: it sees
super-res's samples, whose outlines carry small misplaced tokens (a notch in an edge, a
rounded corner) that a decoder trained on the tokenizer's codes draws as they are. With
`finetune_decoder.superres_rows`, `finetune-decoder` trains on pairs (super-res's sample from the
image's true low-res grid and caption, the image itself), so the decoder learns to draw the
image super-res meant. The pairs are sampled once, before training, with super-res's own
recorded sampler, and kept as one file the training workers read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from muse.config import SamplerConfig, SamplingConfig
from muse.contracts import TokensSchema, TransformerRecord
from muse.datasets.stream import iter_tar
from muse.datasets.tokens import TokenTable, collate
from muse.micro_conditions import of_batch as micro_of
from muse.models.transformer import MaskedTransformer
from muse.sampling import decode
from muse.training import to_device
from muse.transformer_training import CaptionMemory

log = logging.getLogger("muse.superres_codes")

BATCH = 64  # rows sampled together


@torch.no_grad()
def sample_codes(model: MaskedTransformer, sampler: SamplerConfig, batch: dict, text: CaptionMemory,
                 generator: torch.Generator) -> torch.Tensor:
    """[B, n] super-res grids for a batch of token rows (their `tokens_low` and captions), guided as generation
    guides it: the text dropped in the unconditional branch, the low-res grid in both."""
    emb, mask = text(batch)
    micro = micro_of(model, batch)
    memory, memory_mask = model.memory(emb, mask, batch["tokens_low"], None, micro)
    uncond, uncond_mask = model.memory(emb, torch.zeros_like(mask), batch["tokens_low"], None, micro)
    return decode(model, memory, memory_mask, uncond, uncond_mask, sampler, generator)


def write_pairs(superres: MaskedTransformer, superres_path: Path, tokens_path: Path, train_files: list[Path],
                decode_image, rows: int, seed: int, out: Path, device: torch.device) -> int:
    """Samples super-res's codes for the first `rows` train rows of `tokens_path` and writes them with their
    images (uint8, from `train_files`) to `out` (.npz: codes [R, n], images [R, H, W, 3]); returns R."""
    record = TransformerRecord.of(superres_path)
    sampler = record.sampling or SamplingConfig().superres  # as generation samples it
    schema = TokensSchema.of(tokens_path)
    text = CaptionMemory(schema.text.encoder if schema.text else record.text_encoder, schema.text is not None, device)
    columns = ["key", "caption", "tokens_low", *(["text_emb", "text_len"] if schema.text else []),
               *(["micro_conds"] if superres.spec.micro_conditions else [])]
    table = TokenTable(tokens_path, "train", columns)
    count = min(rows, len(table))
    generator = torch.Generator(device).manual_seed(seed)
    keys, codes = [], []
    for start in tqdm(range(0, count, BATCH), desc="super-res codes", unit="batch", disable=None):  # a terminal only
        batch = collate([table[i] for i in range(start, min(start + BATCH, count))])
        keys += batch["key"]
        batch = to_device(batch, device)
        codes.append(sample_codes(superres, sampler, batch, text, generator).cpu())
    wanted = {k: i for i, k in enumerate(keys)}
    images: list[np.ndarray | None] = [None] * count
    for path in train_files:
        for key, files in iter_tar(path):
            if key in wanted:
                images[wanted[key]] = ((decode_image(files) + 1) * 127.5).round().clamp(0, 255).byte() \
                    .permute(1, 2, 0).numpy()
    missing = [k for k, im in zip(keys, images) if im is None]
    if missing:
        raise ValueError(f"{tokens_path}: train row key {missing[0]!r} has no image in the shards' train tars "
                         f"({len(missing)} rows lack one): the tokens were made from other shards")
    np.savez(out, codes=torch.cat(codes).numpy().astype(np.int64), images=np.stack(images))
    log.info("super-res codes: %d train rows sampled (%d steps each) with their images -> %s", count, sampler.steps,
             out)
    return count


def pair_batches(path: Path, batch_size: int, seed: int, position: int, rank: int, world: int):
    """Endless {"codes", "image"} batches of this rank's share of the pairs: one seeded permutation per epoch,
    the epochs end to end, starting after `position` of this rank's samples (exact resume)."""
    data = np.load(path)
    codes, images = torch.from_numpy(data["codes"]), torch.from_numpy(data["images"])
    own = torch.arange(rank, len(codes), world)

    def indices():
        epoch, skip = divmod(position, len(own))
        while True:
            order = torch.randperm(len(own), generator=torch.Generator().manual_seed(seed + epoch))
            yield from own[order][skip:].tolist()
            epoch, skip = epoch + 1, 0

    stream = indices()
    while True:
        picks = [next(stream) for _ in range(batch_size)]
        yield {"codes": codes[picks], "image": images[picks].permute(0, 3, 1, 2).float() / 127.5 - 1}
