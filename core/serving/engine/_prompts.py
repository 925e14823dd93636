"""Prompts for the engine: a dialogue fitted to the context window, as token ids."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from core.serving.dialogue import BOT_SPEAKER, DialogueEncoder, Turn


def build_prompt_ids(
    turns: Sequence[Turn], *, tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int, history_turns: int
) -> list[int]:
    """Token ids of the prompt for `turns`, cut from the left to fit `max_prompt_tokens`.

    The ids come from `DialogueEncoder` (user text as plain text, EOS ids inserted), never from tokenizing the
    prompt's text, so no message can end its turn early and write one for the bot. The newest turn matters most,
    so old history goes first: at most `history_turns` turns before the newest are kept, then whole oldest turns
    are dropped until the prompt fits; if the newest turn alone is still too long, its speaker label is kept with
    its last tokens (the end of a long message is what a reply answers).
    """
    encoder = DialogueEncoder(tokenizer)
    kept = encoder.turns(turns)[-(history_turns + 1) :]
    dialogue = encoder.fit(kept, responder=BOT_SPEAKER, open_reply=True, max_tokens=max_prompt_tokens)
    ids = dialogue.ids
    if len(ids) <= max_prompt_tokens:
        return ids
    head = ids[: dialogue.spans[0].text_start] if dialogue.spans else []
    if len(head) >= max_prompt_tokens // 2:
        return ids[-max_prompt_tokens:]
    return head + ids[len(ids) - (max_prompt_tokens - len(head)) :]
