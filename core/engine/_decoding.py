"""One batched `generate`: prompts fitted to the context window in, one clean reply per row out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from core.dialogue import BOT_SPEAKER, DialogueEncoder, Turn, clean_text, parse_reply
from core.engine._loading import LoadedModel
from core.engine._types import GenerationParams

EMPTY_REPLY = "…"
"""Last-resort reply when the model's turn is empty after parsing (e.g. it wrote only a speaker label).

EOS and blank tokens are suppressed at the first step, so this is rare; answering "…" beats an empty message,
which the platforms reject.
"""


class Row(Protocol):
    """One request in a batch, as decoding sees it; `withdrawn` turns true when its caller gives up."""

    @property
    def turns(self) -> Sequence[Turn]: ...

    @property
    def withdrawn(self) -> bool: ...


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


def generate_replies(
    loaded: LoadedModel, rows: Sequence[Row], params: GenerationParams, *, history_turns: int, seed: int | None
) -> list[str]:
    """The bot's reply for each row, from one `generate` call (run under `torch.inference_mode`).

    The reply gets `max_new_tokens` (never `max_length`, so a long prompt cannot eat into it), capped at half the
    context window; the prompt gets the rest.
    """
    new_tokens = min(params.max_new_tokens, loaded.context_window // 2)
    min_new = min(params.min_new_tokens, new_tokens)
    tokenizer = loaded.tokenizer
    prompts = [
        build_prompt_ids(
            row.turns,
            tokenizer=tokenizer,
            max_prompt_tokens=loaded.context_window - new_tokens,
            history_turns=history_turns,
        )
        for row in rows
    ]
    inputs = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(loaded.model.device)
    prompt_length = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([_TopKTopPSampler(params)] if params.temperature > 0 else [])
    if seed is not None:
        torch.manual_seed(seed)  # per batch: the same batch gets the same answers, whatever was served before
    output = loaded.model.generate(  # type: ignore[operator]
        **inputs,
        generation_config=_generation_config(params, loaded, new_tokens=new_tokens, min_new=min_new),
        logits_processor=processors,
        stopping_criteria=StoppingCriteriaList([_EndOfTurn(loaded, rows, prompt_length, min_new)]),
    )
    texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
    return [_reply_text(text, eos=tokenizer.eos_token) for text in texts]


def _generation_config(
    params: GenerationParams, loaded: LoadedModel, *, new_tokens: int, min_new: int
) -> GenerationConfig:
    """Greedy decoding as far as `generate` knows: with a temperature, `_TopKTopPSampler` has already drawn the
    token and left only it standing."""
    eos_id = loaded.tokenizer.eos_token_id
    return GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=min_new,
        repetition_penalty=params.repetition_penalty,
        pad_token_id=eos_id,
        eos_token_id=eos_id,
        begin_suppress_tokens=list(loaded.blank_ids) or None,
    )


class _TopKTopPSampler(LogitsProcessor):
    """Temperature, top-k and top-p sampling that draws among the top-k candidates only.

    `generate`'s own sampling sorts and draws over the whole vocabulary for every row at every step (a
    [batch, 50257] sort plus multinomial), which costs about as much as the LM head itself at batch 16 on CPU.
    Drawing among the k best is the same distribution for a fraction of that. It runs after `generate`'s own
    processors (repetition penalty, EOS suppression) and returns scores where only the drawn token is finite.
    """

    def __init__(self, params: GenerationParams) -> None:
        self._temperature = params.temperature
        self._top_k = params.top_k
        self._top_p = params.top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        k = vocab if self._top_k == 0 else min(self._top_k, vocab)
        values, indices = (scores / self._temperature).topk(k, dim=-1)
        probs = values.softmax(dim=-1)
        if self._top_p < 1.0:
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= self._top_p, 0.0)  # the best always stays
        chosen = indices.gather(-1, torch.multinomial(probs, num_samples=1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)  # type: ignore[return-value]


class _EndOfTurn(StoppingCriteria):
    """Stops a row once its text holds a complete next-speaker label (models that never emit EOS), or once its
    caller has withdrawn. Only rows whose newest token contains ":" are decoded, which keeps the check cheap."""

    def __init__(self, loaded: LoadedModel, rows: Sequence[Row], prompt_length: int, min_new: int) -> None:
        self._loaded = loaded
        self._rows = rows
        self._prompt_length = prompt_length
        self._min_new = min_new

    def __call__(self, input_ids: torch.LongTensor, scores: object, **kwargs: Any) -> torch.BoolTensor:
        done = [row.withdrawn for row in self._rows]
        if input_ids.shape[1] - self._prompt_length >= self._min_new:
            eos = self._loaded.tokenizer.eos_token
            for row, last in enumerate(input_ids[:, -1].tolist()):
                if not done[row] and last in self._loaded.colon_ids:
                    text = cast(str, self._loaded.tokenizer.decode(input_ids[row, self._prompt_length :]))
                    done[row] = parse_reply(text, eos=eos) != clean_text(text, eos=eos)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def _reply_text(generated: str, *, eos: str) -> str:
    """The bot's line from decoded new tokens; U+FFFD (a multi-byte character cut by the token limit) is removed."""
    return parse_reply(generated.replace("\ufffd", ""), eos=eos) or EMPTY_REPLY
