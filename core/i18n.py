"""Which language Magpie speaks to a person, and the message catalogue its words come from.

English is the source language: a text's English wording is its gettext msgid (marked `_()`, `N_()` or
`ngettext()` where it is written, in `core.texts` and a few marked strings beside it), and English needs no
catalogue. Every other language is one catalogue of the `magpie` domain, `core/locale/<language>/LC_MESSAGES/
magpie.po`, read with Babel at first use: no compile step, so the `.po` files ship as package data and a plain
`pip install .` speaks Korean too. Entries marked fuzzy are not used (gettext's own rule).

Which language: adapters put the person's language tag (Telegram's `language_code`, Discord's locale, the
console's LANG) on `IncomingMessage.language`; the core speaks it for the whole handling of that message with
`speaking(...)`. It is a context variable, as in Django's `translation.override`, so the functions in
`core.texts` need no language argument, and work started while handling a message (a training run that reports
back to the chat that asked for it) keeps speaking that person's language. Code that writes for a language it
names (Telegram's per-language command menu, Discord's command localizations) uses `translate`. A web page (the
operator's dashboard) speaks `accepted_language(...)` of the browser's Accept-Language header.
"""

from __future__ import annotations

import gettext
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from importlib import resources

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

DOMAIN = "magpie"
SOURCE_LANGUAGE = "en"
LANGUAGES = ("en", "ko")
"""Every language Magpie speaks; the first is the source language (the msgids) and the fallback."""

_TAG = re.compile(r"[A-Za-z]{2,3}")
_current: ContextVar[str] = ContextVar("magpie_language", default=SOURCE_LANGUAGE)


def supported_language(tag: str | None) -> str:
    """The language Magpie speaks for a platform's language tag: its primary subtag when Magpie has a catalogue
    for it (`ko`, `ko-KR`, `ko_KR.UTF-8` → `ko`), else English (also for None, `C`, `POSIX` and `fr`)."""
    primary = _primary(tag or "")
    return primary if primary in LANGUAGES else SOURCE_LANGUAGE


def accepted_language(header: str | None) -> str:
    """The language Magpie speaks to a browser: the most preferred language of its `Accept-Language` header
    (RFC 9110 §12.5.4: `ko-KR,ko;q=0.9,en;q=0.8`) that Magpie speaks, else English. `*` names no language and
    `q=0` refuses one, so both are passed over."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate((header or "").split(",")):
        tag, _sep, parameters = part.partition(";")
        language, weight = _primary(tag.strip()), _weight(parameters)
        if language in LANGUAGES and weight > 0:
            ranked.append((-weight, index, language))  # the highest weight; among equals, the first listed
    return min(ranked)[2] if ranked else SOURCE_LANGUAGE


def _primary(tag: str) -> str:
    """A language tag's primary subtag in lower case (`ko_KR.UTF-8` → `ko`), or "" when it has none."""
    match = _TAG.match(tag)
    return match.group(0).lower() if match else ""


def _weight(parameters: str) -> float:
    """The `q` of a language range's parameters (1 when absent; 0, so refused, when it is not a number)."""
    for parameter in parameters.split(";"):
        name, _eq, value = parameter.strip().partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


@contextmanager
def speaking(language: str | None) -> Iterator[str]:
    """Speaks `language` (any tag `supported_language` accepts) until the block ends; yields the one chosen."""
    chosen = supported_language(language)
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


def current_language() -> str:
    return _current.get()


def _(message: str) -> str:
    """`message` (an English msgid) in the language being spoken."""
    return catalogue(_current.get()).gettext(message)


def ngettext(singular: str, plural: str, count: int) -> str:
    """The form for `count` in the language being spoken (Korean has one form; English two)."""
    return catalogue(_current.get()).ngettext(singular, plural, count)


def N_(message: str) -> str:
    """Marks a constant's English text for the catalogue without translating it yet: the code that sends it calls
    `_()` on it when it knows whom it speaks to (gettext's deferred translation)."""
    return message


def translate(message: str, language: str | None) -> str:
    """`message` in a language named outright, whatever is being spoken."""
    return catalogue(supported_language(language)).gettext(message)


@cache
def catalogue(language: str) -> gettext.NullTranslations:
    """The translations for a language in `LANGUAGES`; English's is the identity."""
    if language == SOURCE_LANGUAGE:
        return gettext.NullTranslations()
    if language not in LANGUAGES:
        raise ValueError(f"Magpie has no catalogue for {language!r}; it speaks {', '.join(LANGUAGES)}")
    path = resources.files("core").joinpath("locale", language, "LC_MESSAGES", f"{DOMAIN}.po")
    with path.open("rb") as source:
        catalog = read_po(source, locale=language, domain=DOMAIN)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return gettext.GNUTranslations(compiled)
