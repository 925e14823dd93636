"""Text-level filters of the training data: PII redaction, near-duplicate normalisation, repetition, the blocklist,
and the stable hash that makes every selection deterministic."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

from confusable_homoglyphs import confusables

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<![0-9A-Za-z+])\+?\d[\d ().-]{5,}\d(?![0-9A-Za-z])")
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_REPEATED_UNIT = re.compile(r"(.{1,4}?)\1{3,}")
_LONG_RUNS = re.compile(r"(.)\1{2,}")


def redact_pii(text: str) -> str:
    """Replaces e-mail addresses and phone-like numbers (7-15 digits, not dates) with placeholders."""
    text = _EMAIL.sub("[email]", text)

    def phone(match: re.Match[str]) -> str:
        candidate = match.group(0)
        digits = sum(ch.isdigit() for ch in candidate)
        if not 7 <= digits <= 15 or _DATE.fullmatch(candidate.strip()):
            return candidate
        return "[phone]"

    return _PHONE.sub(phone, text)


def normalise(text: str) -> str:
    """The text two near-duplicates share: case, punctuation, spacing and stretched letters ("sooo") removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch if ch.isalnum() else " " for ch in text)
    text = _LONG_RUNS.sub(r"\1\1", text)
    return " ".join(text.split())


def is_repetitive(text: str) -> bool:
    """A line that is mostly one repeated word or a short repeated unit ("lol lol lol lol", "hahahahaha")."""
    words = normalise(text).split()
    if len(words) >= 3 and Counter(words).most_common(1)[0][1] / len(words) >= 0.6:
        return True
    compact = "".join(text.split())
    return len(compact) >= 8 and _REPEATED_UNIT.fullmatch(compact) is not None


def is_blocklisted(text: str, blocklist: Sequence[str]) -> bool:
    """Whether `text` contains a TRAIN_BLOCKLIST entry, compared as they look rather than as they are encoded."""
    seen = lookalike_key(text)
    return any(lookalike_key(item) in seen for item in blocklist)


def lookalike_key(text: str) -> str:
    """What `text` looks like: NFKC (fullwidth `ｃｒｙｐｔｏ` is `crypto`), casefolded, invisible format characters
    (zero-width spaces, soft hyphens) removed, and every letter that Unicode's confusables list as a look-alike of
    an ASCII letter or digit (Cyrillic `у`, Greek `ο`) replaced by it, so `crуpto` is `crypto` too."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(_ascii_lookalike(ch) for ch in folded if unicodedata.category(ch) != "Cf")


@functools.cache
def _ascii_lookalike(ch: str) -> str:
    """The ASCII letter or digit `ch` is a homoglyph of (confusable-homoglyphs' copy of Unicode's confusables.txt),
    else `ch` itself. Non-Latin text with no ASCII look-alike (Hangul, most CJK) is left as it is."""
    if ch.isascii():
        return ch
    found = confusables.is_confusable(ch, greedy=True, preferred_aliases=["latin", "common"]) or []
    for entry in found:
        for glyph in entry["homoglyphs"]:
            if len(glyph["c"]) == 1 and glyph["c"].isascii() and glyph["c"].isalnum():
                return str(glyph["c"]).lower()
    return ch


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key`: the same chat lands in the same split on every run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2**64
