"""Samples -> token ids and labels -> packed blocks or padded batches.

Why this exists instead of `DataCollatorForLanguageModeling` with `padding="max_length"` (the seed notebook):
GPT-2 has no pad token, so pad = EOS, and that collator masks every position whose id equals the pad id — which
also masks the real end-of-turn EOS, so the model never learns to stop talking. Here labels are built per sample
before any padding exists, and the collator masks padding by *position* (beyond each row's length), never by id.
Padding every chat line to 512 tokens also spent ~94% of the compute on padding; packing (run_clm's
`group_texts`) concatenates shuffled samples and cuts the stream into full blocks, so almost nothing is padding.
Labels are built per turn: a context-only line (`Line.learnable` false) is masked wherever it appears, so what
the dataset demoted to context is read by the model but never taught to it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase

from core.serving.dialogue import DialogueEncoder, DialogueIds
from trainer.samples import Line, Sample

IGNORE_INDEX = -100
"""Label value that the loss skips (PyTorch's cross-entropy `ignore_index`)."""

Features = dict[str, list[int]]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A sample as ids; `labels` is `input_ids` with -100 on every token that must not be learned."""

    input_ids: list[int]
    labels: list[int]
    sample: Sample


@dataclass
class EncodingStats:
    """How the token-length bound changed the data (reported in metrics.json)."""

    trimmed: int = 0
    too_long: int = 0
    nothing_to_learn: int = 0
    """Samples dropped because every token was masked (a target that is not `learnable`)."""


def encode_samples(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    response_only: bool,
    stats: EncodingStats | None = None,
) -> list[Encoded]:
    """Tokenises samples, dropping the oldest context turns of any that exceed `max_length` tokens.

    The ids come from `core.serving.dialogue.DialogueEncoder`, the engine's own: user text is never parsed into special
    tokens, and a sample's ids start with exactly the prompt ids the engine would build for its context. A sample
    whose target alone does not fit is dropped, and so is one with nothing left to learn.
    """
    stats = stats if stats is not None else EncodingStats()
    encoder = DialogueEncoder(tokenizer)
    encoder.turns([line.turn for sample in samples for line in (*sample.context, sample.target)])  # one batch
    encoded = []
    for sample in samples:
        lines = (*sample.context, sample.target)
        turns = encoder.turns([line.turn for line in lines])
        dialogue = encoder.fit(turns, responder=sample.target.speaker, open_reply=False, max_tokens=max_length)
        if len(dialogue.ids) > max_length or not dialogue.spans or dialogue.spans[-1].source != len(sample.context):
            stats.too_long += 1  # (or a target that cleaning left empty, which the dataset never produces)
            continue
        if len(dialogue.spans) < len(turns):
            stats.trimmed += 1
        labels = _labels(dialogue, lines, response_only=response_only)
        if all(label == IGNORE_INDEX for label in labels):
            stats.nothing_to_learn += 1
            continue
        kept = replace(sample, context=sample.context[dialogue.spans[0].source :])
        encoded.append(Encoded(dialogue.ids, labels, kept))
    return encoded


def _labels(dialogue: DialogueIds, lines: Sequence[Line], *, response_only: bool) -> list[int]:
    """Labels per turn, as DialoGPT weights turns: a line that is not `learnable` (blocklisted, repetitive,
    capped, a near-duplicate, a bot reply that is not a target) gets no loss on any of its tokens, label and EOS
    included, whatever the loss setting; with `response_only` only the target's text and EOS are learned."""
    labels = [IGNORE_INDEX] * len(dialogue.ids)
    target = len(lines) - 1
    for span in dialogue.spans:
        if not lines[span.source].learnable or (response_only and span.source != target):
            continue
        start = span.text_start if response_only else span.start
        labels[start : span.end] = dialogue.ids[start : span.end]
    return labels


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
