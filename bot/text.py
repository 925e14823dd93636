"""Splitting long replies into platform-sized messages without cutting words or characters."""

from __future__ import annotations

import re
from collections.abc import Callable

_BREAKS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\n\s*\n"),  # paragraphs
    re.compile(r"\n"),  # lines
    re.compile(r"(?<=[.!?。！？…])\s+"),  # sentences
    re.compile(r"\s+"),  # words
)


def utf16_length(text: str) -> int:
    """Telegram counts message length in UTF-16 code units (an emoji outside the BMP counts twice)."""
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int, length: Callable[[str], int] = len) -> list[str]:
    """Splits `text` into chunks of at most `limit` (as measured by `length`), preferring paragraph, then line,
    then sentence, then word boundaries; a single word longer than the limit is cut between code points."""
    if limit <= 0:
        raise ValueError("limit must be positive")
    chunks: list[str] = []
    rest = text.strip()
    while rest:
        if length(rest) <= limit:
            chunks.append(rest)
            break
        cut = _best_cut(rest, limit, length)
        chunk, rest = rest[:cut].rstrip(), rest[cut:].lstrip()
        if chunk:
            chunks.append(chunk)
    return chunks


def _best_cut(text: str, limit: int, length: Callable[[str], int]) -> int:
    fits = _longest_prefix(text, limit, length)
    window = text[:fits]
    for pattern in _BREAKS:
        ends = [match.end() for match in pattern.finditer(window) if match.start() > 0]
        if ends and ends[-1] > fits // 4:
            return ends[-1]
    return _avoid_splitting_cluster(text, fits)


def _longest_prefix(text: str, limit: int, length: Callable[[str], int]) -> int:
    low, high = 1, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if length(text[:mid]) <= limit:
            low = mid
        else:
            high = mid - 1
    return low


def _avoid_splitting_cluster(text: str, cut: int) -> int:
    """Steps back over joiners and combining marks so an emoji sequence or accented letter stays whole."""
    start = cut
    while cut > 1 and (_joins(text[cut]) or _joins(text[cut - 1])):
        cut -= 1
    return cut if cut > start // 2 else start


def _joins(char: str) -> bool:
    import unicodedata

    return char in "\u200d\ufe0f" or unicodedata.combining(char) > 0 or 0x1F3FB <= ord(char) <= 0x1F3FF
