"""Iteration-level batching: one KV cache for the running rows, which rows join and leave between decoding steps.

Layout: every row's tokens end at the right edge of the cache (left padding), so one step appends one column for
all rows. Rows that join are prefilled together in one forward pass; their cache is then padded on the left to the
batch's width and stacked under the running rows. A row that leaves is dropped from the batch dimension and the
columns that have become padding for every row are trimmed. The attention mask hides the padding and explicit
position ids give each row the positions it would have alone, so a row's tokens do not depend on who else is in the
batch (up to floating-point summation order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from core.serving.engine._compiled import decoding_model

_SPARE_COLUMNS = 64  # room to grow before a layer's buffer is reallocated


class _SlotLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A cache layer whose keys and values live in a buffer with spare columns.

    `DynamicLayer` concatenates each step, which copies the whole cache of every layer per generated token; here a
    step writes one column, and the buffer is reallocated only when the spare columns run out.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._key_buffer = torch.empty(0)
        self._value_buffer = torch.empty(0)
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        added = key_states.shape[-2]
        if not self.is_initialized:
            self.device = key_states.device
            self.is_initialized = True
            self._key_buffer = _allocate(key_states, 0)
            self._value_buffer = _allocate(value_states, 0)
        elif self._length + added > self._key_buffer.shape[-2]:
            self._key_buffer = _grown(self._key_buffer, self._length, added)
            self._value_buffer = _grown(self._value_buffer, self._length, added)
        self._key_buffer[:, :, self._length : self._length + added] = key_states
        self._value_buffer[:, :, self._length : self._length + added] = value_states
        self._length += added
        self._refresh_views()
        return self.keys, self.values  # type: ignore[return-value]

    def get_seq_length(self) -> int:
        return self._length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self._refresh_views()

    def trim_left(self, columns: int) -> None:
        """Drops `columns` leading columns (padding for every row); the buffer keeps its spare columns."""
        self._key_buffer = self._key_buffer[:, :, columns:]
        self._value_buffer = self._value_buffer[:, :, columns:]
        self._length -= columns
        self._refresh_views()

    def zero_masked(self, mask: torch.Tensor) -> None:
        """Zeroes padding positions: a prefill's padding rows can hold NaN (a query that may attend to nothing), and
        NaN times a zero attention weight is still NaN once the row is stacked under others."""
        hidden = ~mask.bool()[:, None, :, None]
        self.keys.masked_fill_(hidden, 0.0)  # type: ignore[union-attr]
        self.values.masked_fill_(hidden, 0.0)  # type: ignore[union-attr]

    @classmethod
    def stacked(cls, top: _SlotLayer, bottom: _SlotLayer) -> _SlotLayer:
        """`top`'s rows over `bottom`'s, both right-aligned in a buffer as wide as the wider of the two."""
        layer = cls()
        layer.device, layer.is_initialized, layer._length = top.device, True, max(top._length, bottom._length)
        layer._key_buffer = _stack(top._key_buffer, top._length, bottom._key_buffer, bottom._length)
        layer._value_buffer = _stack(top._value_buffer, top._length, bottom._value_buffer, bottom._length)
        layer._refresh_views()
        return layer

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]


def _allocate(states: torch.Tensor, length: int) -> torch.Tensor:
    batch, heads, added, dim = states.shape
    return states.new_zeros((batch, heads, length + added + _SPARE_COLUMNS, dim))


def _grown(buffer: torch.Tensor, length: int, added: int) -> torch.Tensor:
    batch, heads, _, dim = buffer.shape
    grown = buffer.new_zeros((batch, heads, length + added + max(_SPARE_COLUMNS, length // 2), dim))
    grown[:, :, :length] = buffer[:, :, :length]
    return grown


def _stack(top: torch.Tensor, top_length: int, bottom: torch.Tensor, bottom_length: int) -> torch.Tensor:
    split, heads, _, dim = top.shape
    width = max(top_length, bottom_length)
    buffer = top.new_zeros((split + bottom.shape[0], heads, width + _SPARE_COLUMNS, dim))
    buffer[:split, :, width - top_length : width] = top[:, :, :top_length]
    buffer[split:, :, width - bottom_length : width] = bottom[:, :, :bottom_length]
    return buffer


class KVBatch:
    """The running rows' cache, attention mask and positions, for one model.

    Rows are addressed by their index in the batch; the caller keeps its own per-row state in the same order.
    """

    def __init__(self, model: Any) -> None:
        self._model = decoding_model(model)  # single-token steps through the fused step where it applies
        self._cache: Cache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return int(self._positions.shape[0])

    @property
    def width(self) -> int:
        return int(self._mask.shape[1])

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Runs `prompts` through the model, appends them as new rows and returns their next-token logits."""
        width = max(len(prompt) for prompt in prompts)
        device = self._model.device
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = Cache(layer_class_to_replicate=_SlotLayer)
        output = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
        for layer in cache.layers:
            assert isinstance(layer, _SlotLayer)
            layer.zero_masked(mask)
        self._append(cache, mask, torch.tensor([len(p) for p in prompts], device=device))
        logits: torch.Tensor = output.logits[:, -1, :].float()
        return logits

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feeds each row its newest token; returns every row's next-token logits."""
        device = self._model.device
        self._mask = torch.cat([self._mask, torch.ones((self.rows, 1), dtype=torch.long, device=device)], dim=1)
        output = self._model(
            input_ids=torch.tensor(tokens, device=device)[:, None],
            attention_mask=self._mask,
            position_ids=self._positions[:, None],
            cache=self._cache,
        )
        self._positions = self._positions + 1
        logits: torch.Tensor = output.logits[:, -1, :].float()
        return logits

    def keep(self, indices: Sequence[int]) -> None:
        """Keeps only the rows at `indices` (in that order) and trims the columns now padding for all of them."""
        if len(indices) == self.rows:
            return
        if not indices:
            self._cache, self._mask = None, self._mask[:0, :0]
            self._positions = self._positions[:0]
            return
        assert self._cache is not None
        selected = torch.tensor(list(indices), dtype=torch.long, device=self._mask.device)
        self._mask, self._positions = self._mask[selected], self._positions[selected]
        padding = int((self._mask.shape[1] - self._mask.sum(dim=1)).min())
        self._mask = self._mask[:, padding:]
        for layer in self._cache.layers:
            assert isinstance(layer, _SlotLayer)
            layer.batch_select_indices(selected)
            if padding:
                layer.trim_left(padding)

    def _append(self, cache: Cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, mask, positions
            return
        layers = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            assert isinstance(old, _SlotLayer) and isinstance(new, _SlotLayer)
            layers.append(_SlotLayer.stacked(old, new))
        self._cache = Cache(layers=list(layers))
        width = max(self.width, mask.shape[1])
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        self._positions = torch.cat([self._positions, positions])


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
