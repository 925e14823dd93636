from __future__ import annotations

from bot.text import split_message, utf16_length


def test_short_text_is_one_chunk() -> None:
    assert split_message("hello", 10) == ["hello"]


def test_splits_on_paragraphs_then_sentences_never_mid_word() -> None:
    text = ("Lorem ipsum dolor sit amet. " * 30 + "\n\n") * 5
    chunks = split_message(text, 400)
    assert all(len(chunk) <= 400 for chunk in chunks)
    words = text.split()
    assert " ".join(chunks).split() == words
    assert all(chunk.endswith(".") for chunk in chunks)


def test_utf16_limits_count_emoji_twice() -> None:
    text = "😀" * 3000
    chunks = split_message(text, 4096, utf16_length)
    assert all(utf16_length(chunk) <= 4096 for chunk in chunks)
    assert "".join(chunks) == text


def test_a_huge_word_is_cut_between_code_points_and_keeps_emoji_sequences() -> None:
    family = "👨\u200d👩\u200d👧"
    text = "a" * 9 + family * 10
    chunks = split_message(text, 10)
    assert "".join(chunks) == text
    assert all(len(chunk) <= 10 for chunk in chunks)
    assert not any(chunk.startswith("\u200d") or chunk.endswith("\u200d") for chunk in chunks)
