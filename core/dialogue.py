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
  emit, so generation stops on it; for the pretrained ``gpt2``, which rarely emits EOS, `parse_reply` also cuts at
  the next speaker label it invents.
- *Responder perspective* lets training use human turns as targets: the human whose line is the target is
  ``Bot`` in that sample, exactly as the bot is ``Bot`` at inference, so the model learns "how this community
  answers" under the same label it is asked to fill. A training sample with its target is a prompt plus the
  target's text and EOS, so the prompt is always a prefix of the sample (response-only loss relies on that).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

GPT2_EOS = "<|endoftext|>"
"""The end-of-text token of every GPT-2-family model (gpt2, DialoGPT, the starter). Inference takes the EOS from
the loaded tokenizer; this constant is for code that formats text without one (corpus samples, exports)."""

BOT_SPEAKER = "bot"
"""The speaker key of Magpie's own turns at inference time."""

RESPONDER_LABEL = "Bot"
OTHER_LABEL = "User"

_NEXT_SPEAKER = re.compile(rf"\n\s*(?:{RESPONDER_LABEL}|{OTHER_LABEL} \d+)\s*:")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_MANY_NEWLINES = re.compile(r"\n{3,}")


@dataclass(frozen=True, slots=True)
class Turn:
    """One line of a conversation: who said it (a stable key, not a display name) and what."""

    speaker: str
    text: str


def clean_text(text: str, *, eos: str) -> str:
    """Normalises a turn so that user text can never forge a turn boundary or a special token."""
    text = unicodedata.normalize("NFC", text)
    if eos:
        text = text.replace(eos, "")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def speaker_labels(turns: Sequence[Turn], *, responder: str) -> dict[str, str]:
    """Maps speaker keys to anonymous labels: the responder is `Bot`, others `User n` by first appearance."""
    labels = {responder: RESPONDER_LABEL}
    for turn in turns:
        if turn.speaker not in labels:
            labels[turn.speaker] = f"{OTHER_LABEL} {len(labels)}"
    return labels


def format_dialogue(turns: Sequence[Turn], *, responder: str = BOT_SPEAKER, eos: str, open_reply: bool = True) -> str:
    """Renders turns as model text; with `open_reply` the text ends where the responder's next line begins.

    Empty and whitespace-only turns are dropped: they carry nothing and would teach the model to say nothing.
    """
    kept = [Turn(t.speaker, cleaned) for t in turns if (cleaned := clean_text(t.text, eos=eos))]
    labels = speaker_labels(kept, responder=responder)
    text = "".join(f"{labels[turn.speaker]}: {turn.text}{eos}" for turn in kept)
    if open_reply:
        text += f"{RESPONDER_LABEL}:"
    return text


def parse_reply(generated: str, *, eos: str) -> str:
    """Extracts the responder's line from generated text: up to EOS or the next speaker label."""
    if eos:
        generated = generated.split(eos, 1)[0]
    match = _NEXT_SPEAKER.search(generated)
    if match:
        generated = generated[: match.start()]
    return clean_text(generated, eos=eos)
