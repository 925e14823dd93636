"""Rehearsal: a slice of the corpus a base model learned from, trained again beside a community's own lines.

Why (measured with `bench/learning.py`, docs/benchmarks.md, issue #19): fine-tuned at the starter's rate on a
community's few hundred lines, the starter forgot what else it knew, and questions nobody had taught ("do you like
music?") were answered with one of the community's taught answers, 4 times in 10: lately, every question it had
seen was followed by a taught answer. Training a slice of its own corpus again beside the community's lines
(rehearsal, the usual remedy for such forgetting) keeps it answering other questions as before.

The slice is public corpus text, never anyone's logged words, and it is only trained on: the held-out split, the
promotion gate and the recall probe stay the community's. A base names its corpus in its `config.json`
(`REHEARSAL_KEY`: the chatterbot-corpus languages it was built from). The offline starter does, and every version
trained from it keeps its config; OpenAI's GPT-2 names none and gets no rehearsal.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from trainer.corpus import load_dialogues
from trainer.dataset import samples_from_dialogues
from trainer.filters import stable_fraction
from trainer.samples import Sample

log = logging.getLogger(__name__)

REHEARSAL_KEY = "magpie_rehearsal_corpus"


def named_corpus(model_source: str) -> tuple[str, ...]:
    """The corpus languages a local model's config names (empty for a Hub name or a model that names none)."""
    config = Path(model_source) / "config.json"
    if not config.is_file():
        return ()
    value = json.loads(config.read_text(encoding="utf-8")).get(REHEARSAL_KEY)
    return tuple(str(language) for language in value) if isinstance(value, list) else ()


def rehearsal_samples(model_source: str, *, community_samples: int, share: float, history_turns: int) -> list[Sample]:
    """`share` corpus samples per community training sample (all of the corpus at most), a stable hash-chosen
    slice, for a model that names its corpus; none otherwise."""
    languages = named_corpus(model_source)
    wanted = round(community_samples * share)
    if not languages or wanted <= 0:
        return []
    try:
        corpus = samples_from_dialogues(load_dialogues(languages), history_turns=history_turns)
    except (ImportError, FileNotFoundError) as missing:  # chatterbot-corpus is a dependency; a broken install
        log.warning("no rehearsal: the corpus %s could not be read (%s)", ", ".join(languages), missing)
        return []
    ranked = sorted(corpus, key=lambda s: stable_fraction(f"rehearsal:{s.conversation}:{s.target.text}"))
    return ranked[:wanted]
