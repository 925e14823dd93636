"""The one dialogue format, shared by inference and training.

A conversation is rendered from the point of view of one *responder*, the speaker whose next line the model
writes. Every turn becomes ``"<label>: <text><eos>"``; the responder is labelled ``Bot`` and everyone else
``User 1``, ``User 2``… in order of first appearance. A prompt ends with the open line ``"Bot:"``.

Why this shape:
- *Speaker labels* keep multi-speaker group chats legible (who said what), and ``Name: text`` transcripts are
  something the pretrained ``gpt2`` has seen plenty of, so it continues them sensibly even before fine-tuning.
- *Anonymous labels* keep display names (personal data) out of the model and make the format identical for every
  chat, which is what lets a small model learn it.
- *EOS after every turn* (as DialoGPT does) gives a fine-tuned model an unambiguous "my turn is over" token to
  emit, so generation stops on it; for the pretrained ``gpt2``, which rarely emits EOS, and for small models that
  half-learned the format, `parse_reply` also cuts at the next speaker label they invent: anywhere, not only at
  the start of a line (the starter wrote ``저는 I aBot:: A.`` and ``aUser 1: I aBot: IBot: Do``), and with any
  number, spacing or colon (``User 7 :``, ``Bot：``). A reply is one turn: no label of the format reaches a chat.
- *Responder perspective* lets training use human turns as targets: the human whose line is the target is
  ``Bot`` in that sample, exactly as the bot is ``Bot`` at inference, so the model learns "how this community
  answers" under the same label it is asked to fill. A training sample with its target is a prompt plus the
  target's text and EOS, so the prompt is always a prefix of the sample (response-only loss relies on that).

Token ids come only from `DialogueEncoder`, never from tokenizing `format_dialogue`'s text: a tokenizer parses the
string ``<|endoftext|>`` in its input as the EOS token, so any user who can get that string (or one that cleaning
turns into it) into a message could end a turn early and write the next one, ``Bot:`` included. The encoder
tokenizes each label and each turn's text as plain text (special-token strings stay ordinary characters) and
inserts the EOS id itself, so every turn holds exactly one EOS, at its end. `format_dialogue` renders the same
format as text, for exports and the corpus.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GPT2_EOS = "<|endoftext|>"
"""The end-of-text token of every GPT-2-family model (gpt2, DialoGPT, the starter), under its one name in the code.
Inference takes the EOS from the loaded tokenizer; this constant is for code that formats text without one (corpus
samples, exports) and for the starter's tokenizer, which is built with it."""

BOT_SPEAKER = "bot"
"""The speaker key of Magpie's own turns."""

RESPONDER_LABEL = "Bot"
OTHER_LABEL = "User"

_LABEL = re.compile(rf"(?:{RESPONDER_LABEL}|{OTHER_LABEL}(?:\s*\d+)?)\s*[:\uff1a]")
"""A speaker label of the format as a model writes it: glued to the word before or not, any user number (or none),
any spacing, an ASCII or a full-width colon."""
_OWN_LABELS = re.compile(rf"\A(?:\s*{RESPONDER_LABEL}\s*[:\uff1a]+)+")
"""The responder's own label repeated at the start of its line (the prompt already ends with it)."""
_PARTIAL_LABEL = re.compile(rf"(?<![ \t])(?:{RESPONDER_LABEL}|{OTHER_LABEL}(?:\s*\d+)?)\s*\Z")
"""A label cut off before its colon at the end of the reply (the token budget ran out): on a line of its own or
glued to the word before (``I aBot``); ``I am a Bot`` keeps its word."""
_LINE_BREAKS = re.compile(r"\r\n?|[\x85\u2028\u2029]")
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f"  # C0 and C1 controls (tab and line breaks stay)
    "\u00ad\u034f\u180e\u200b\u2060-\u2064\ufeff"  # soft hyphen, grapheme joiner, zero-width spaces
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u206f"  # bidi marks, embeddings, overrides, isolates
    "\ud800-\udfff]"  # lone surrogates
)
"""Characters that show nothing (or reorder what is shown) and can hide one string inside another.

ZWJ (U+200D), ZWNJ (U+200C) and variation selectors stay: emoji sequences and several scripts need them. Lone
surrogates (only from broken clients) go because no tokenizer can encode them."""
_MANY_NEWLINES = re.compile(r"\n{3,}")


@dataclass(frozen=True, slots=True)
class Turn:
    """One line of a conversation: who said it (a stable key, not a display name) and what."""

    speaker: str
    text: str


def speaker_key(author_id: int | None, *, bot: bool) -> str:
    """The stable key of a logged message's speaker: `BOT_SPEAKER` for the bot's turns, ``user:<id>`` for people.

    Inference (the chat history) and training (the dataset) must key speakers the same way: the labels a prompt
    shows (`Bot`, `User 1`…) are numbered by these keys, so a second rule would give the model different labels
    for the same conversation at training and at inference.
    """
    return BOT_SPEAKER if bot else f"user:{author_id}"


def clean_text(text: str, *, eos: str) -> str:
    """Normalises a turn so that user text can never forge a turn boundary or a special token.

    Repeated until nothing changes: removing one thing can join the pieces around it into another (a zero-width
    space inside ``<|endoftext|>``, or the token nested inside itself), and a single pass would leave that.
    The result is a fixed point, so cleaning already-clean text (the dataset's lines, again at encoding) is a
    no-op. This is defence in depth: `DialogueEncoder` never parses special tokens in text whatever it holds.
    """
    specials = [token for token in dict.fromkeys((eos, GPT2_EOS)) if token]
    previous = None
    while text != previous:
        previous = text
        text = unicodedata.normalize("NFC", _INVISIBLE.sub("", text))
        for token in specials:
            text = text.replace(token, "")
        text = _MANY_NEWLINES.sub("\n\n", _LINE_BREAKS.sub("\n", text)).strip()
    return text


def speaker_labels(speakers: Iterable[str], *, responder: str) -> dict[str, str]:
    """Maps speaker keys to anonymous labels: the responder is `Bot`, others `User n` by first appearance."""
    labels = {responder: RESPONDER_LABEL}
    for speaker in speakers:
        if speaker not in labels:
            labels[speaker] = f"{OTHER_LABEL} {len(labels)}"
    return labels


def format_dialogue(turns: Sequence[Turn], *, responder: str = BOT_SPEAKER, eos: str, open_reply: bool = True) -> str:
    """Renders turns as text (exports, the corpus); with `open_reply` it ends where the responder's line begins.

    Never tokenize this text for a model: the tokenizer would read special-token strings as tokens. Use
    `DialogueEncoder`, which produces the same format as ids. Empty and whitespace-only turns are dropped: they
    carry nothing and would teach the model to say nothing.
    """
    kept = [Turn(t.speaker, cleaned) for t in turns if (cleaned := clean_text(t.text, eos=eos))]
    labels = speaker_labels((turn.speaker for turn in kept), responder=responder)
    text = "".join(f"{labels[turn.speaker]}: {turn.text}{eos}" for turn in kept)
    if open_reply:
        text += f"{RESPONDER_LABEL}:"
    return text


def parse_reply(generated: str, *, eos: str) -> str:
    """Extracts the responder's line from generated text: up to EOS or the next speaker label; no label of the
    format is left in it. The one place a reply is cleaned (the engine ends a reply by the same rule,
    `turn_ended`).

    Cleaned before it is cut, since cleaning can join a label (``Bo\u200bt:``); what is left after the cut holds
    no label (the cut is at the first one), and cutting and stripping cannot make one.
    """
    if eos:
        generated = generated.split(eos, 1)[0]
    reply = _OWN_LABELS.sub("", clean_text(generated, eos=eos))
    match = _LABEL.search(reply)
    if match:
        reply = reply[: match.start()]
    previous = None
    while reply != previous:  # ``xUserBot``: each cut can leave another partial label at the end
        previous, reply = reply, _PARTIAL_LABEL.sub("", reply.rstrip())
    return clean_text(reply, eos=eos)


def turn_ended(generated: str, *, eos: str) -> bool:
    """Whether generated text already starts another speaker's turn (a label after the responder's own), so
    generation can stop: for models that never write EOS."""
    return _LABEL.search(_OWN_LABELS.sub("", clean_text(generated, eos=eos))) is not None


# --- the format as token ids ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnIds:
    """One cleaned, non-empty turn with its text as plain-text token ids (``" <text>"``, label not included)."""

    speaker: str
    text_ids: tuple[int, ...]
    source: int
    """Its index in the turns it was made from (empty turns are dropped, so indices can skip)."""


@dataclass(frozen=True, slots=True)
class TurnSpan:
    """Where one turn lies in a dialogue's ids: ``[start, text_start)`` is its label and colon, then its text,
    then its EOS at ``end - 1``."""

    source: int
    start: int
    text_start: int
    end: int


@dataclass(frozen=True, slots=True)
class DialogueIds:
    """A dialogue as token ids plus each turn's span (training masks by span); an open reply follows the last."""

    ids: list[int]
    spans: tuple[TurnSpan, ...]


class DialogueEncoder:
    """The dialogue format as token ids, for inference prompts and training samples alike.

    Each turn is ``tokens("<label>:") + tokens(" <text>") + [eos id]`` and an open reply is ``tokens("Bot:")``.
    Label and text are tokenized as separate plain-text pieces (`split_special_tokens=True`, and any special id
    that still came out is dropped), so user text can never yield an EOS or any other special token. Because the
    responder's label is its own piece, a prompt's ids are exactly a prefix of the ids of the same dialogue
    continued by the responder's turn. For GPT-2's byte-level BPE the ids equal those of tokenizing the rendered
    text of ordinary turns, because ": " always starts a new pre-token. Cleaning and pieces are cached (one
    encoder per dataset or batch): training contexts repeat the same lines many times, and labels renumber
    whenever a turn is dropped.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._eos = str(tokenizer.eos_token)
        self.eos_id = int(tokenizer.eos_token_id)
        self._special_ids = frozenset(tokenizer.all_special_ids) | {self.eos_id}
        self._pieces: dict[str, tuple[int, ...]] = {}
        self._cleaned: dict[str, str] = {}

    def turns(self, turns: Sequence[Turn]) -> list[TurnIds]:
        """Cleans and tokenizes turns (one batched tokenizer call); empty ones are dropped."""
        for raw in dict.fromkeys(turn.text for turn in turns):
            if raw not in self._cleaned:
                cleaned = clean_text(raw, eos=self._eos)
                self._cleaned[raw] = f" {cleaned}" if cleaned else ""
        kept = [(index, turn.speaker, piece) for index, turn in enumerate(turns) if (piece := self._cleaned[turn.text])]
        pieces = self._plain([piece for _, _, piece in kept])
        return [TurnIds(speaker, ids, index) for (index, speaker, _), ids in zip(kept, pieces, strict=True)]

    def assemble(self, turns: Sequence[TurnIds], *, responder: str, open_reply: bool) -> DialogueIds:
        """Joins tokenized turns with their labels (numbered from the first turn given) and EOS ids."""
        labels = speaker_labels((turn.speaker for turn in turns), responder=responder)
        heads = self._plain([f"{labels[turn.speaker]}:" for turn in turns] + [f"{RESPONDER_LABEL}:"])
        ids: list[int] = []
        spans = []
        for turn, head in zip(turns, heads[:-1], strict=True):
            start = len(ids)
            ids += head
            text_start = len(ids)
            ids += turn.text_ids
            ids.append(self.eos_id)
            spans.append(TurnSpan(turn.source, start, text_start, len(ids)))
        if open_reply:
            ids += heads[-1]
        return DialogueIds(ids, tuple(spans))

    def fit(self, turns: Sequence[TurnIds], *, responder: str, open_reply: bool, max_tokens: int) -> DialogueIds:
        """Drops whole oldest turns until the ids fit in `max_tokens` or one turn is left (callers check)."""
        start = 0
        while True:
            dialogue = self.assemble(turns[start:], responder=responder, open_reply=open_reply)
            if len(dialogue.ids) <= max_tokens or len(turns) - start <= 1:
                return dialogue
            start += 1

    def _plain(self, pieces: Sequence[str]) -> list[tuple[int, ...]]:
        """Token ids of each piece as plain text: special-token strings in it are ordinary characters."""
        missing = [piece for piece in dict.fromkeys(pieces) if piece not in self._pieces]
        if missing:
            encoded = self._tokenizer(missing, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            for piece, ids in zip(missing, encoded, strict=True):
                self._pieces[piece] = tuple(i for i in ids if i not in self._special_ids)
        return [self._pieces[piece] for piece in pieces]


def encode_dialogue(
    turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase, *, responder: str = BOT_SPEAKER, open_reply: bool = True
) -> DialogueIds:
    """`format_dialogue` as token ids, without ever parsing user text into special tokens (see `DialogueEncoder`)."""
    encoder = DialogueEncoder(tokenizer)
    return encoder.assemble(encoder.turns(turns), responder=responder, open_reply=open_reply)
