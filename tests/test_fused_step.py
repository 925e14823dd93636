"""The fused decoding step (core/serving/engine/_compiled.py): the same logits and replies as the model call, and the
model call wherever the fused step does not apply."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from torch import nn

import core.serving.engine._batching as batching_module
import core.serving.engine._compiled as compiled_module
from core.serving.dialogue import Turn
from core.serving.engine import Engine, ModelRef, Precision
from core.serving.engine._batching import KVBatch
from core.serving.engine._compiled import DecodingModel, FusedStep, decoding_model, fused_step
from core.serving.engine._loading import prepare
from tests.conftest import engine_config, generation_params

PROMPTS = (
    [Turn("user:1", "hello there, how are you today?")],
    [Turn("user:1", "what is your favourite colour?")],
    [Turn("user:2", "pizza or pasta?"), Turn("bot", "pasta!"), Turn("user:2", "why?")],
    [Turn("user:3", "tell me a story about the sea and a long walk")],
)


def _logits_of_a_session(batch: KVBatch) -> list[torch.Tensor]:
    """Prefill two rows, step, let a third join, step, let one leave, step: every logits tensor on the way."""
    with torch.inference_mode():
        logits = [batch.prefill([[5, 6, 7, 8, 9, 10], [11, 12, 13]])]
        tokens = [int(t) for t in logits[-1].argmax(-1)]
        for step in range(9):
            if step == 3:
                joined = batch.prefill([[1, 2, 3, 4] * 3])
                tokens.append(int(joined.argmax(-1)[0]))
                logits.append(joined)
            if step == 6:
                batch.keep([0, 2])
                tokens = [tokens[0], tokens[2]]
            logits.append(batch.step(tokens))
            tokens = [int(t) for t in logits[-1].argmax(-1)]
    return logits


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_fused_step_gives_the_model_calls_logits_bit_for_bit(tiny_model_dir: Path, precision: Precision) -> None:
    model = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", precision).model
    fused = KVBatch(model)
    assert isinstance(fused._model, DecodingModel), "the tiny GPT-2 decodes through the fused step"
    plain = KVBatch(model)
    plain._model = model
    for expected, got in zip(_logits_of_a_session(plain), _logits_of_a_session(fused), strict=True):
        assert torch.equal(expected, got)


async def _replies(source: Path, precision: Precision) -> list[str]:
    """Greedy replies to PROMPTS, all at once (a batch with padding) and then each alone."""
    engine = Engine(
        engine_config(params=generation_params(max_new_tokens=8, temperature=0.0), seed=0, precision=precision)
    )
    await engine.start(ModelRef(str(source), "tiny"))
    try:
        together = await asyncio.gather(*(engine.generate_response(turns) for turns in PROMPTS))
        alone = [await engine.generate_response(turns) for turns in PROMPTS]
    finally:
        await engine.close()
    return [reply.text for reply in [*together, *alone]]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
async def test_greedy_replies_are_identical_with_and_without_the_fused_step(
    tiny_model_dir: Path, precision: Precision, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_call = FusedStep.__call__

    def counted(self: FusedStep, *args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real_call(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FusedStep, "__call__", counted)
    fused = await _replies(tiny_model_dir, precision)
    assert calls, "the engine's steps went through the fused step"
    monkeypatch.setattr(batching_module, "decoding_model", lambda model: model)
    assert await _replies(tiny_model_dir, precision) == fused


class _Adapted(nn.Module):
    """A projection wrapped by something the fused step does not know (as an adapter would wrap it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden)  # type: ignore[no-any-return]


async def test_a_model_the_fused_step_does_not_know_decodes_through_the_model_call(tiny_model_dir: Path) -> None:
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "fp32")
    assert fused_step(loaded.model) is not None
    block = loaded.model.transformer.h[0]
    block.attn.c_attn = _Adapted(block.attn.c_attn)
    assert fused_step(loaded.model) is None
    assert decoding_model(loaded.model) is loaded.model
    assert compiled_module._unsupported(nn.Linear(2, 2)) == "Linear is not GPT-2"
    hooked = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "fp32").model
    hooked.transformer.h[1].mlp.register_forward_hook(lambda *_: None)
    assert "hooked" in (compiled_module._unsupported(hooked) or "")
    loaded.model.config.activation_function = "relu"
    assert "activation" in (compiled_module._unsupported(loaded.model) or "")
    batch = KVBatch(loaded.model)  # and the fallback still decodes
    with torch.inference_mode():
        batch.prefill([[5, 6, 7]])
        assert batch.step([8]).shape[0] == 1


def test_a_batch_built_before_a_voice_was_attached_steps_through_the_voices_layers(tiny_model_dir: Path) -> None:
    """A KV batch's fused step is built when the batch is; a voice loaded later wraps the projections it read. From
    then on its steps go through the model call, or the voice's rows would be answered without their adapter."""
    model = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "fp32").model
    batch = KVBatch(model)
    assert isinstance(batch._model, DecodingModel) and not batch._model.adapted
    calls: list[int] = []
    with torch.inference_mode():
        tokens = [int(batch.prefill([[5, 6, 7, 8]]).argmax(-1)[0])]
        block = model.transformer.h[0]
        block.attn.c_attn = _Adapted(block.attn.c_attn)
        block.attn.c_attn.register_forward_hook(lambda *_: calls.append(1))
        compiled_module.mark_adapted(model)
        batch.step(tokens)
    assert batch._model.adapted and calls == [1], "the step went through the wrapped projection"
