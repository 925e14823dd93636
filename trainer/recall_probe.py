"""The recall probe: does a version answer the community's recurring questions the way the community does?

The gate's held-out loss scores next-line prediction in full context, and a version can do well on it while
answering nothing right when asked plainly (docs/benchmarks.md, issue #19). So every run also asks both the
active version and the new one the held-out conversations' *recurring exchanges*, in the shape a fresh chat gives
the bot (`User 1: <prompt><eos>Bot:`), and counts how many come back with the recurring answer.

A recurring exchange is a prompt (normalised text, `trainer.filters.normalise`) whose most frequent answer in the
whole dataset was given by at least `trainer.exchanges.RECURRING_PEOPLE` different people and by more than half of
those who answered it: agreement, not one account's habit (`trainer.exchanges.recurring_answers`). The probe asks
the prompts that occur in the held-out split (at most `MAX_PROMPTS`, chosen by a stable hash), greedily, so the
numbers are reproducible. It is reported to the admin and stored in the run's metrics under `recall_probe`
(`{"prompts": n, "active": hits, "new": hits}`), where the dashboard can read it; it does not decide the promotion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.outcomes import RECALL_PROBE
from core.serving.dialogue import BOT_SPEAKER, Turn, encode_dialogue, parse_reply
from trainer.exchanges import recurring_answers
from trainer.filters import normalise, stable_fraction
from trainer.samples import DatasetReport

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MAX_PROMPTS = 20
MAX_NEW_TOKENS = 24

METRIC = RECALL_PROBE
"""The key of the probe's result in a run's metrics."""


@dataclass(frozen=True, slots=True)
class ProbeItem:
    prompt: str
    answer: str
    """The recurring answer, normalised."""


def probe_items(report: DatasetReport) -> list[ProbeItem]:
    """The held-out split's recurring prompts, one per distinct prompt, at most `MAX_PROMPTS`."""
    recurring = recurring_answers([*report.train, *report.eval])
    items: dict[str, ProbeItem] = {}
    for sample in report.eval:
        if sample.answers is None:
            continue
        key = normalise(sample.answers.text)
        if key in recurring and key not in items:
            items[key] = ProbeItem(sample.answers.text, recurring[key])
    chosen = sorted(items, key=lambda key: stable_fraction(f"probe:{key}"))[:MAX_PROMPTS]
    return [items[key] for key in chosen]


def recalled(model_dir: str, items: Sequence[ProbeItem], *, threads: int | None = None) -> int:
    """How many probe prompts the model answers, greedily, with their recurring answer."""
    from trainer.train import context_size, load_for_training

    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_for_training(model_dir)
    model.train(False)
    eos, eos_id = str(tokenizer.eos_token), int(tokenizer.eos_token_id)
    hits = 0
    with torch.inference_mode():
        for item in items:
            ids = encode_dialogue([Turn("user:probe", item.prompt)], tokenizer, responder=BOT_SPEAKER).ids
            new = _greedy(model, ids, eos_id=eos_id, limit=min(MAX_NEW_TOKENS, context_size(model) - len(ids)))
            reply = parse_reply(str(tokenizer.decode(new)), eos=eos)
            hits += normalise(reply) == item.answer
    return hits


def _greedy(model: PreTrainedModel, prompt: list[int], *, eos_id: int, limit: int) -> list[int]:
    """The most likely continuation up to EOS (no cache: the probe's prompts and answers are a few tokens)."""
    ids = list(prompt)
    for _ in range(max(0, limit)):
        logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits
        token = int(logits[0, -1].argmax())
        if token == eos_id:
            break
        ids.append(token)
    return ids[len(prompt) :]
