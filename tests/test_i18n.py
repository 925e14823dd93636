"""One catalogue, English and Korean: every text a person reads is a msgid with a Korean translation, and the
core answers each person in their own language.

The catalogue checks are what the lead reads after a merge: a text added to `core/texts.py` in the old style (a
plain string or f-string) fails `test_texts_module_has_no_unmarked_words`; a marked one without Korean fails
`test_every_msgid_has_a_korean_translation` (run `make messages`, then translate the empty entries).
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import re
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from core import texts
from core.chat.commands import COMMANDS, command_named
from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.errors import EngineBusyError
from core.i18n import LANGUAGES, SOURCE_LANGUAGE, _, current_language, speaking, supported_language, translate
from core.outcomes import RunEndReason, recorded_reason
from core.serving.engine import Engine
from core.settings import Settings, load_settings
from core.storage.db import Database

ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = {"_": None, "N_": None, "ngettext": (1, 2)}
"""The gettext keywords Magpie marks texts with (`core.i18n`); `make messages` extracts with the same."""
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def _extracted() -> dict[str | tuple[str, str], str]:
    """Every msgid marked in the code (singular, or (singular, plural)), with where it was found."""
    found: dict[str | tuple[str, str], str] = {}
    for package in ("core", "bot", "trainer"):
        for filename, line, message, _comments, _context in extract_from_dir(ROOT / package, keywords=KEYWORDS):
            key = message if isinstance(message, str) else (message[0], message[1])
            found.setdefault(key, f"{package}/{filename}:{line}")
    return found


def _catalogue(language: str) -> Catalog:
    with (ROOT / "core" / "locale" / language / "LC_MESSAGES" / "magpie.po").open("rb") as source:
        return read_po(source, locale=language)


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


# --- the catalogue -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", [language for language in LANGUAGES if language != SOURCE_LANGUAGE])
def test_every_msgid_has_a_korean_translation(language: str) -> None:
    catalogue = _catalogue(language)
    problems = []
    for msgid, where in _extracted().items():
        entry = catalogue.get(msgid)
        translations = (
            [] if entry is None else list(entry.string) if isinstance(entry.string, tuple) else [entry.string]
        )
        if entry is None or entry.fuzzy or not all(translations):
            problems.append(f"{where}: {msgid!r} has no {language} translation")
            continue
        singular = msgid if isinstance(msgid, str) else msgid[0]
        problems += [
            f"{where}: {msgid!r}: the {language} text has fields {_fields(text)}, the English {_fields(singular)}"
            for text in translations
            if _fields(text) != _fields(singular)
        ]
    assert not problems, "\n".join(problems)


def test_the_catalogue_holds_only_texts_the_code_uses() -> None:
    used = set(_extracted())
    stale = [entry.id for entry in _catalogue("ko") if entry.id and entry.id not in used]
    assert not stale, f"run `make messages`: no code marks {stale}"


def test_texts_module_has_no_unmarked_words() -> None:
    """A string with letters in `core/texts.py` is inside `_()`, `N_()` or `ngettext()`, or is a docstring."""
    tree = ast.parse((ROOT / "core" / "texts.py").read_text())
    marked: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in KEYWORDS:
            marked.update(id(inner) for argument in node.args for inner in ast.walk(argument))
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            marked.update(id(inner) for inner in _docstrings(node))
        if isinstance(node, ast.FormattedValue) and node.format_spec is not None:
            marked.update(id(inner) for inner in ast.walk(node.format_spec))  # `:.3f` is not a word
        marked.update(id(key) for key in _lookup_keys(node))  # `metrics["eval_loss"]` is not a word either
    unmarked = [
        f"core/texts.py:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in marked
        and re.search(r"[A-Za-z]", node.value)
    ]
    assert not unmarked, "texts people read must be catalogue msgids:\n" + "\n".join(unmarked)


def _lookup_keys(node: ast.AST) -> list[ast.AST]:
    """The keys a dictionary is read with: `d["key"]`, `d.get("key", …)`, `"key" in d`."""
    if isinstance(node, ast.Subscript):
        return [node.slice]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return node.args[:1]
    if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In | ast.NotIn):
        return [node.left]
    return []


def _docstrings(node: ast.AST) -> Iterator[ast.AST]:
    """The docstring of a module, class or function, and the attribute docstrings after its assignments."""
    body = getattr(node, "body", [])
    for index, statement in enumerate(body):
        is_string = isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
        if is_string and (index == 0 or isinstance(body[index - 1], ast.Assign | ast.AnnAssign)):
            yield statement.value


# --- choosing the language ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "language"),
    [
        ("ko", "ko"),
        ("ko-KR", "ko"),
        ("ko_KR.UTF-8", "ko"),
        ("KO", "ko"),
        ("en-US", "en"),
        ("en", "en"),
        ("fr", "en"),
        ("C", "en"),
        ("C.UTF-8", "en"),
        ("POSIX", "en"),
        ("", "en"),
        (None, "en"),
    ],
)
def test_a_platform_language_tag_picks_a_catalogue_or_english(tag: str | None, language: str) -> None:
    assert supported_language(tag) == language


async def test_the_language_spoken_lasts_for_the_block_and_follows_work_started_in_it() -> None:
    assert _(texts.NOT_TEXT) == "I can only read text messages for now."
    with speaking("ko-KR"):
        assert _(texts.NOT_TEXT) == "지금은 텍스트 메시지만 읽을 수 있어요."
        assert texts.run_progress(3, 0.5) == "학습 #3: 50% 완료."
        with speaking(None):
            assert texts.run_progress(3, 0.5) == "Training run #3: 50% done."
        reporter = asyncio.create_task(_report_later())  # a task copies the context it was created in
    assert current_language() == "en"
    assert await reporter == "학습 #7: 25% 완료."
    help_command = command_named("help")
    assert help_command is not None
    assert translate(help_command.help, "ko") == "명령 목록 보기"
    assert translate(help_command.help, "de") == "List the commands"


async def _report_later() -> str:
    await asyncio.sleep(0)
    return texts.run_progress(7, 0.25)


def test_english_and_korean_plurals() -> None:
    assert texts.export_ready(1) == "Here is the 1 message I have from you."
    assert texts.export_ready(2) == "Here are the 2 messages I have from you."
    with speaking("ko"):
        assert texts.export_ready(2) == "제가 가진 메시지 2개를 보내 드려요."


def test_the_console_language_comes_from_the_posix_locale_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT / "tests")  # no .env here
    assert load_settings().console_language is None
    monkeypatch.setenv("LANG", "ko_KR.UTF-8")
    assert load_settings().console_language == "ko_KR.UTF-8"
    monkeypatch.setenv("LC_ALL", "C.UTF-8")  # LC_ALL overrides LANG, as in POSIX
    assert supported_language(load_settings().console_language) == "en"


# --- the chat service answers each person in their language ---------------------------------------------------------

_ids = itertools.count(1)
ADMIN = "42"


def _said(text: str | None, *, language: str | None, user: str = ADMIN) -> IncomingMessage:
    return IncomingMessage(
        platform="telegram",
        chat_id=user,
        chat_kind=ChatKind.PRIVATE,
        author_id=user,
        author_name=f"name-{user}",
        text=text,
        message_id=f"i18n-{next(_ids)}",
        addressed=True,
        language=language,
    )


@pytest.fixture
def service(db: Database, engine: Engine, tmp_path: Path) -> ChatService:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url="unused",
        admin_ids=f"telegram:{ADMIN}",
        models_dir=tmp_path / "models",
        max_input_chars=50,
        rate_limit_per_minute=3,
    )
    return ChatService(settings=settings, db=db, engine=engine)


async def test_every_command_and_refusal_answers_a_korean_speaker_in_korean(service: ChatService) -> None:
    """Run over `COMMANDS` itself, so a command merged in later without Korean fails here too."""
    said = [f"/{command.name}" for command in COMMANDS] + ["/nosuchcommand", "x" * 51, None]
    for text in said:
        reply = await service.handle(_said(text, language="ko"))
        assert reply is not None and HANGUL.search(reply.text), f"{text!r} was answered in English: {reply!r}"
    refused = await service.handle(_said("/status", language="ko-KR", user="7"))
    assert refused is not None and refused.text == "죄송해요, 그 명령은 봇 관리자만 쓸 수 있어요."
    for _attempt in range(4):  # the rate limit (3 a minute) is spent by the third
        reply = await service.handle(_said("/help", language="ko", user="8"))
    assert reply is not None and reply.text.startswith("와, 메시지가 정말 많네요!")


async def test_the_same_commands_answer_an_english_speaker_in_english(service: ChatService) -> None:
    for text, language in (("/help", "en-US"), ("/reset", None), ("/optin", "fr")):
        reply = await service.handle(_said(text, language=language))
        assert reply is not None and not HANGUL.search(reply.text), reply
    busy = await service.handle(_said("hello", language="ko"), busy=True)
    assert busy is not None and busy.text == translate(EngineBusyError.user_message, "ko") != texts.BUSY


def test_every_run_end_reason_is_worded_and_old_free_text_still_shows() -> None:
    """A reason added to `RunEndReason` without its words fails here; rows recorded before reasons were typed
    hold English, shown as it is."""
    for reason in RunEndReason:
        with speaking("ko"):
            korean = texts.run_end_reason(reason)
        english = texts.run_end_reason(reason)
        assert english not in (reason.value, korean), reason
    assert texts.run_end_reason(recorded_reason("stopped by cli:me (magpie retrain --stop-running)")) == (
        "stopped by cli:me (magpie retrain --stop-running)"
    )
    assert recorded_reason(RunEndReason.KILLED.value) is RunEndReason.KILLED and recorded_reason(None) is None
