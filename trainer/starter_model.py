"""Building a GPT-2 from scratch: a byte-level BPE tokenizer trained locally and a randomly initialised model.

Used by `magpie bootstrap` (the offline starter model) and by the test suite's tiny models, so that both go
through the real `save_pretrained` / `from_pretrained` path without the Hugging Face Hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from core.serving.dialogue import GPT2_EOS


@dataclass(frozen=True)
class ModelShape:
    """The size of a from-scratch GPT-2; the defaults are the offline starter's."""

    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 512
    vocab_size: int = 8000
    dropout: float = 0.1


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> GPT2Tokenizer:
    """Trains a GPT-2-style byte-level BPE; byte-level means any Unicode text (Korean, emoji, RTL) encodes."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[GPT2_EOS], show_progress=False
    )
    # The raw `tokenizers.Tokenizer`, not the ByteLevelBPETokenizer wrapper: transformers calls methods (padding,
    # truncation) whose signatures only the raw class has.
    backend = Tokenizer.from_str(bpe.to_str())
    tokenizer = GPT2Tokenizer(tokenizer_object=backend, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS)
    if len(tokenizer) < 257:
        raise RuntimeError(f"tokenizer training produced only {len(tokenizer)} tokens")
    return tokenizer


def build_model(tokenizer: GPT2Tokenizer, shape: ModelShape, *, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized for `tokenizer`."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=shape.dropout,
        embd_pdrop=shape.dropout,
        attn_pdrop=shape.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def save_model(model: GPT2LMHeadModel, tokenizer: GPT2Tokenizer, directory: Path) -> Path:
    """Saves weights (safetensors), config and tokenizer so `from_pretrained(directory)` loads them."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
