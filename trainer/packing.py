"""Samples -> token ids and labels -> packed blocks or padded batches.

Why this exists instead of `DataCollatorForLanguageModeling` with `padding="max_length"` (the seed notebook):
GPT-2 has no pad token, so pad = EOS, and that collator masks every position whose id equals the pad id — which
also masks the real end-of-turn EOS, so the model never learns to stop talking. Here labels are built per sample
before any padding exists, and the collator masks padding by *position* (beyond each row's length), never by id.
Padding every chat line to 512 tokens also spent ~94% of the compute on padding; packing (run_clm's
`group_texts`) concatenates shuffled samples and cuts the stream into full blocks, so almost nothing is padding.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from trainer.dataset import Sample

IGNORE_INDEX = -100
"""Label value that the loss skips (PyTorch's cross-entropy `ignore_index`)."""

Features = dict[str, list[int]]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A sample as ids; `labels` is `input_ids` with the prompt masked when the loss is on the response only."""

    input_ids: list[int]
    labels: list[int]
    sample: Sample


@dataclass
class EncodingStats:
    """How the token-length bound changed the data (reported in metrics.json)."""

    trimmed: int = 0
    too_long: int = 0


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    encoded: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return encoded


def encode_samples(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    response_only: bool,
    stats: EncodingStats | None = None,
) -> list[Encoded]:
    """Tokenises samples, dropping the oldest context turns of any that exceed `max_length` tokens.

    The prompt and the response are tokenised separately and concatenated, so the prompt's ids are exactly what
    the engine feeds the model at inference and the response mask falls on a token boundary. A sample whose
    target alone does not fit is dropped.
    """
    stats = stats if stats is not None else EncodingStats()
    eos = str(tokenizer.eos_token)
    prompts = [s.prompt(eos) for s in samples]
    rests = [s.text(eos)[len(p) :] for s, p in zip(samples, prompts, strict=True)]
    encoded = []
    for sample, first_prompt, first_rest in zip(samples, _ids(tokenizer, prompts), _ids(tokenizer, rests), strict=True):
        fitted = _fit(sample, first_prompt, first_rest, tokenizer, max_length)
        if fitted is None:
            stats.too_long += 1
            continue
        if fitted[0] is not sample:
            stats.trimmed += 1
        kept, prompt_ids, rest_ids = fitted
        labels = ([IGNORE_INDEX] * len(prompt_ids) if response_only else list(prompt_ids)) + list(rest_ids)
        encoded.append(Encoded(list(prompt_ids) + list(rest_ids), labels, kept))
    return encoded


def _fit(
    sample: Sample, prompt_ids: list[int], rest_ids: list[int], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[Sample, list[int], list[int]] | None:
    """Drops the oldest context turns until the sample fits (labels renumber, so it re-renders each time)."""
    eos = str(tokenizer.eos_token)
    while len(prompt_ids) + len(rest_ids) > max_length:
        if not sample.context:
            return None
        sample = sample.without_oldest_turn()
        prompt = sample.prompt(eos)
        prompt_ids, rest_ids = _ids(tokenizer, [prompt, sample.text(eos)[len(prompt) :]])
    return sample, prompt_ids, rest_ids


def pack(encoded: Sequence[Encoded], *, block_size: int, seed: int) -> list[Features]:
    """run_clm's `group_texts`: shuffled samples concatenated and cut into `block_size` blocks.

    Shuffling first matters: consecutive samples of one chat repeat each other's context, and side by side in a
    block the model would learn to copy the previous sample instead of predicting the conversation. The last,
    partial block is kept (the collator pads it) rather than dropped as run_clm does: small datasets are the
    norm here and every line counts.
    """
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    input_ids = [token for index in order for token in encoded[index].input_ids]
    labels = [label for index in order for label in encoded[index].labels]
    return [
        {"input_ids": input_ids[start : start + block_size], "labels": labels[start : start + block_size]}
        for start in range(0, len(input_ids), block_size)
    ]


def unpacked(encoded: Sequence[Encoded]) -> list[Features]:
    """One feature row per sample (evaluation, and dynamic padding)."""
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


@dataclass(frozen=True)
class PadCollator:
    """Right-pads a batch to its longest row; padding positions get attention 0 and label -100.

    Padding is recognised by position, not by token id, so a real EOS (which shares the pad id) stays a target.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Features]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
