"""Choosing one row's next token and knowing when its reply is complete.

Each row carries its own `GenerationParams`, so a batch can mix greedy and sampled requests. The processing order
is `generate`'s: repetition penalty over the prompt and the reply so far, end-of-text held back until
`min_new_tokens`, blank tokens held back at the first step, then greedy choice or temperature / top-k / top-p
sampling among the k best (drawing over the whole vocabulary costs about as much as the LM head on CPU). With a
SEED each row samples from its own generator, so a reply does not depend on what else was being served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from core.serving.dialogue import parse_reply, turn_ended
from core.serving.engine._loading import LoadedModel
from core.serving.engine._types import GenerationParams

EMPTY_REPLY = "…"
"""Last-resort reply when the model's turn is empty after parsing (e.g. it wrote only a speaker label).

EOS and blank tokens are suppressed at the first step, so this is rare; answering "…" beats an empty message,
which the platforms reject.
"""


def reply_budget(params: GenerationParams, loaded: LoadedModel) -> int:
    """New tokens a reply may have: `max_new_tokens`, capped at half the context window so the prompt keeps the
    rest (the prompt is fitted to what this leaves)."""
    return min(params.max_new_tokens, loaded.context_window // 2)


class RowDecoder:
    """One reply being decoded: the tokens so far, and the rules that choose the next one and end the reply."""

    def __init__(
        self, loaded: LoadedModel, prompt: Sequence[int], params: GenerationParams, *, seed: int | None
    ) -> None:
        self._loaded = loaded
        self._params = params
        self.max_new = reply_budget(params, loaded)
        self._min_new = min(params.min_new_tokens, self.max_new)
        self._eos = cast(int, loaded.tokenizer.eos_token_id)
        self._seen = set(prompt)
        self._seen_ids: torch.Tensor | None = None
        """The same ids as a tensor for the repetition penalty: built at the first step, grown only by new tokens."""
        self._generator: torch.Generator | None = None
        if seed is not None and params.temperature > 0:
            self._generator = torch.Generator(device=loaded.model.device).manual_seed(seed)
        self.tokens: list[int] = []
        self.done = False

    def choose(self, logits: torch.Tensor) -> int:
        """Picks the next token from this row's logits (float32, one dimension) and records it."""
        scores = self._penalised(logits)
        if len(self.tokens) < self._min_new:
            scores[self._eos] = float("-inf")
        if not self.tokens and self._loaded.blank_ids:
            scores[list(self._loaded.blank_ids)] = float("-inf")
        token = int(scores.argmax()) if self._params.temperature == 0 else self._sample(scores)
        self._record(token)
        return token

    def text(self) -> str:
        """The reply: the bot's line, cut at the end of its turn; U+FFFD (a character cut by the limit) removed."""
        tokenizer = self._loaded.tokenizer
        decoded = cast(str, tokenizer.decode(self.tokens, skip_special_tokens=True))
        return parse_reply(decoded.replace("\ufffd", ""), eos=tokenizer.eos_token) or EMPTY_REPLY

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
        penalty = self._params.repetition_penalty
        if penalty == 1.0 or not self._seen:
            return logits
        if self._seen_ids is None:
            self._seen_ids = torch.tensor(sorted(self._seen), dtype=torch.long, device=logits.device)
        ids = self._seen_ids
        picked = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
        return logits

    def _sample(self, scores: torch.Tensor) -> int:
        params = self._params
        k = scores.shape[-1] if params.top_k == 0 else min(params.top_k, scores.shape[-1])
        values, indices = (scores / params.temperature).topk(k)
        probs = values.softmax(dim=-1)
        if params.top_p < 1.0:
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= params.top_p, 0.0)  # the best always stays
        return int(indices[torch.multinomial(probs, 1, generator=self._generator)])

    def _record(self, token: int) -> None:
        if token == self._eos:
            self.done = True
            return
        self.tokens.append(token)
        if token not in self._seen:
            self._seen.add(token)
            if self._seen_ids is not None:
                self._seen_ids = torch.cat([self._seen_ids, self._seen_ids.new_tensor([token])])
        if len(self.tokens) >= self.max_new:
            self.done = True
        elif len(self.tokens) >= self._min_new and token in self._loaded.colon_ids:
            self.done = self._turn_ended()

    def _turn_ended(self) -> bool:
        """Whether the reply now holds a complete next-speaker label (for models that never write EOS)."""
        text = cast(str, self._loaded.tokenizer.decode(self.tokens))
        return turn_ended(text, eos=self._loaded.tokenizer.eos_token)
