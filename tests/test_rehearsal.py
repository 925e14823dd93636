"""Rehearsal (issue #19): a base that names the corpus it learned from gets a slice of it trained again beside a
community's lines; the slice is corpus text only, chosen the same way every time, and sized by the share."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from trainer.rehearsal import REHEARSAL_KEY, named_corpus, rehearsal_samples


def naming(tiny_model_dir: Path, tmp_path: Path, languages: list[str]) -> str:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    setattr(config, REHEARSAL_KEY, languages)
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def test_a_base_that_names_its_corpus_rehearses_a_stable_slice_of_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = naming(tiny_model_dir, tmp_path, ["english"])
    assert named_corpus(source) == ("english",)
    slice_ = rehearsal_samples(source, community_samples=30, share=0.5, history_turns=4)
    assert len(slice_) == 15
    assert slice_ == rehearsal_samples(source, community_samples=30, share=0.5, history_turns=4)
    # corpus lines only: no logged message, nobody's words, nothing for the training manifest
    assert all(line.message_id is None and line.user_id is None for s in slice_ for line in (*s.context, s.target))
    assert all(s.conversation.startswith("english/") and len(s.context) <= 4 for s in slice_)


def test_no_rehearsal_without_a_named_corpus_or_with_share_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert named_corpus(str(tiny_model_dir)) == () and named_corpus("gpt2") == ()  # a Hub name: no local config
    assert rehearsal_samples(str(tiny_model_dir), community_samples=30, share=1.0, history_turns=4) == []
    source = naming(tiny_model_dir, tmp_path, ["english"])
    assert rehearsal_samples(source, community_samples=30, share=0.0, history_turns=4) == []
