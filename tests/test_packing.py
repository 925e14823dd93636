"""Per-turn labels: a context-only line (`Line.learnable` false) is read by the model but never learned.

Issue #10, item 6: with the default loss on every token, blocklisted, repetitive, capped and near-duplicate lines
that the dataset demoted to context were still trained on in every later sample that showed them as context, and
a blocklisted phrase taught by two dozen people came back verbatim after /retrain.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase

from trainer.packing import IGNORE_INDEX, EncodingStats, PadCollator, encode_samples, pack
from trainer.samples import Line, Sample
from trainer.train import mean_loss

BLOCKED = "buy cheap pills now"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tiny_model_dir)
    return loaded


def chat(*lines: tuple[str, str, bool]) -> list[Line]:
    return [Line(speaker, text, learnable=learnable) for speaker, text, learnable in lines]


def sliding_samples(lines: list[Line], *, history: int = 10) -> list[Sample]:
    """Every learnable line as a target with the lines before it as context, as the dataset builds them."""
    return [
        Sample(tuple(lines[max(0, index - history) : index]), line, "c")
        for index, line in enumerate(lines)
        if line.learnable and index > 0
    ]


def masked_text(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]) -> str:
    return str(
        tokenizer.decode([token for token, label in zip(input_ids, labels, strict=True) if label == IGNORE_INDEX])
    )


def test_a_context_only_line_has_no_loss_in_any_sample(tokenizer: PreTrainedTokenizerBase) -> None:
    eos = tokenizer.eos_token
    lines = chat(
        ("alice", "hello there, how are you today?", True),
        ("spammer", BLOCKED, False),
        ("bob", "I am fine, thank you", True),
        ("alice", "what is your favourite colour?", True),
        ("bob", "I like blue and green", True),
    )
    encoded = encode_samples(sliding_samples(lines), tokenizer, max_length=512, response_only=False)
    showing = [e for e in encoded if any(line.text == BLOCKED for line in e.sample.context)]
    assert len(showing) == 3  # the line is context for every later sample...
    for sample in showing:
        assert BLOCKED in tokenizer.decode(sample.input_ids)
        assert re.fullmatch(
            rf"User \d: {BLOCKED}{re.escape(eos)}", masked_text(tokenizer, sample.input_ids, sample.labels)
        )
        learned = [label for label in sample.labels if label != IGNORE_INDEX]
        assert len(learned) == len(sample.input_ids) - len(tokenizer(f"User 2: {BLOCKED}")["input_ids"]) - 1


def test_learnable_context_is_learned_and_response_only_keeps_just_the_target(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    eos = tokenizer.eos_token
    sample = Sample(
        tuple(chat(("alice", "pizza or pasta?", True), ("spammer", BLOCKED, False))),
        Line("bob", "pizza, obviously"),
        "c",
    )
    (full,) = encode_samples([sample], tokenizer, max_length=512, response_only=False)
    assert masked_text(tokenizer, full.input_ids, full.labels) == f"User 2: {BLOCKED}{eos}"
    (only,) = encode_samples([sample], tokenizer, max_length=512, response_only=True)
    assert only.input_ids == full.input_ids
    learned = [label for label in only.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == f" pizza, obviously{eos}"


def test_trimmed_and_gapped_contexts_mask_the_right_line(tokenizer: PreTrainedTokenizerBase) -> None:
    """Oldest turns dropped to fit, and empty lines skipped, must not shift the mask onto a neighbour."""
    eos = tokenizer.eos_token
    context = [Line("alice", f"turn {index} of a long chat about the sea") for index in range(12)]
    context += [Line("bob", " \u200b "), Line("spammer", BLOCKED, learnable=False), Line("alice", "and then?")]
    stats = EncodingStats()
    (encoded,) = encode_samples(
        [Sample(tuple(context), Line("bob", "the end"), "c")],
        tokenizer,
        max_length=64,
        response_only=False,
        stats=stats,
    )
    assert stats.trimmed == 1 and len(encoded.input_ids) <= 64
    assert encoded.sample.context[-2:] == tuple(context[-2:])
    label = "User 2" if encoded.sample.context[0].speaker == "alice" else "User 1"
    assert masked_text(tokenizer, encoded.input_ids, encoded.labels) == f"{label}: {BLOCKED}{eos}"


def test_a_sample_with_nothing_to_learn_is_dropped(tokenizer: PreTrainedTokenizerBase) -> None:
    stats = EncodingStats()
    sample = Sample(tuple(chat(("alice", "hi", True))), Line("bob", BLOCKED, learnable=False), "c")
    assert encode_samples([sample], tokenizer, max_length=512, response_only=True, stats=stats) == []
    assert stats.nothing_to_learn == 1
    (kept,) = encode_samples([sample], tokenizer, max_length=512, response_only=False)  # its learnable context
    assert tokenizer.decode([label for label in kept.labels if label != IGNORE_INDEX]).startswith("User 1: hi")


def test_training_does_not_teach_a_context_only_phrase(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The same chats trained with the phrase learnable and as context only: only the first teaches it."""
    lines: list[Line] = []
    for index in range(12):
        lines += [Line(f"user{index}", BLOCKED, learnable=False), Line("bob", "I like blue and green")]
    probe = encode_samples([Sample((), Line("x", BLOCKED), "probe")], tokenizer, max_length=64, response_only=True)

    def phrase_loss_after_training(blocked_learnable: bool) -> float:
        data = [Line(line.speaker, line.text, learnable=blocked_learnable or line.text != BLOCKED) for line in lines]
        encoded = encode_samples(sliding_samples(data, history=2), tokenizer, max_length=128, response_only=False)
        batch = PadCollator(tokenizer.eos_token_id)(pack(encoded, block_size=64, seed=0))
        torch.manual_seed(0)
        model = GPT2LMHeadModel.from_pretrained(tiny_model_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(15):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
        loss = mean_loss(model, probe, pad_token_id=tokenizer.eos_token_id)
        assert loss is not None
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model: more threads only contend (20x slower on a busy machine)
    try:
        taught, withheld = phrase_loss_after_training(True), phrase_loss_after_training(False)
    finally:
        torch.set_num_threads(threads)
    assert withheld > taught + 1.0, (withheld, taught)
