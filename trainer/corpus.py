"""Plain dialogues from the BSD-licensed `chatterbot-corpus` package: the offline starter model's training text.

The package ships YAML files (`chatterbot_corpus/data/<language>/*.yml`), each with a `conversations` list whose
items are lists of lines spoken alternately by two people. Nothing is downloaded: the files come with the
installed package.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

DEFAULT_LANGUAGES = ("english", "korean")


@dataclass(frozen=True, slots=True)
class Dialogue:
    """One conversation: its lines in order (speakers alternate) and where it came from, for stable splits."""

    key: str
    lines: tuple[str, ...]


def corpus_dir() -> Path:
    """The installed package's data folder."""
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).resolve().parent / "data"


def load_dialogues(languages: Sequence[str] = DEFAULT_LANGUAGES, *, root: Path | None = None) -> list[Dialogue]:
    """Reads every conversation of the given languages, in a stable order (language, file, position)."""
    root = root or corpus_dir()
    dialogues: list[Dialogue] = []
    for language in languages:
        folder = root / language
        if not folder.is_dir():
            raise FileNotFoundError(f"chatterbot-corpus has no {language!r} folder at {folder}")
        for path in sorted(folder.glob("*.yml")):
            dialogues.extend(_read_file(path, key_prefix=f"{language}/{path.stem}"))
    log.info("loaded %d dialogues from chatterbot-corpus (%s)", len(dialogues), ", ".join(languages))
    return dialogues


def _read_file(path: Path, *, key_prefix: str) -> list[Dialogue]:
    """One YAML file's conversations; non-string lines (a few files nest lists) are skipped, not crashed on."""
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    dialogues = []
    for index, conversation in enumerate(document.get("conversations") or []):
        if not isinstance(conversation, list):
            continue
        lines = tuple(str(line).strip() for line in conversation if isinstance(line, str | int | float))
        lines = tuple(line for line in lines if line)
        if lines:
            dialogues.append(Dialogue(key=f"{key_prefix}#{index}", lines=lines))
    return dialogues
