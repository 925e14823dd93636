"""Iteration-level batching on the real tiny GPT-2: rows join and leave the running batch between decoding steps.

The probe (`tests.engine_probe`) records each forward pass and can hold the worker inside one, so "a request
arrives while others are decoding" is a state the test sets up, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from core.errors import EngineBusyError, EngineClosedError, EngineTimeoutError
from core.serving.dialogue import BOT_SPEAKER, Turn, parse_reply
from core.serving.engine import Engine, Generation, GenerationParams, ModelRef, build_prompt_ids
from tests.conftest import generation_params
from tests.engine_probe import GREEDY, SHORT, WAIT_S, ForwardProbe, make_engine, probe

__all__ = ["make_engine", "probe"]  # fixtures

MakeEngine = Callable[..., Awaitable[Engine]]
PROMPTS = ["안녕하세요, 오늘 기분이 어때요?", "pizza or pasta?", "I like blue", "the sea", "שלום, מה שלומך?"]
LONG = generation_params(max_new_tokens=48, min_new_tokens=48, temperature=0.0)


def chat(text: str) -> list[Turn]:
    return [Turn("alice", "hello there, how are you today?"), Turn(BOT_SPEAKER, "I am fine."), Turn("alice", text)]


def ask(engine: Engine, text: str, params: GenerationParams = SHORT, **kwargs: float) -> asyncio.Task[Generation]:
    return asyncio.create_task(engine.generate_response(chat(text), params=params, **kwargs))


async def held_in_first_prefill(
    engine: Engine, probe: ForwardProbe, text: str = "one", params: GenerationParams = SHORT
) -> asyncio.Task[Generation]:
    """A request whose prefill the worker is held inside (until the test sets `probe.gate`)."""
    probe.forget()
    probe.hold_at_pass(1)
    running = ask(engine, text, params)
    assert (await probe.entered()).prefill
    return running


async def test_arrivals_join_the_running_batch_and_answer_as_they_would_alone(
    make_engine: MakeEngine, probe: ForwardProbe
) -> None:
    engine = await make_engine(max_batch_size=8)
    alone = [(await engine.generate_response(chat(text))).text for text in PROMPTS]
    assert len(set(alone)) > 1, "the prompts should lead to different answers"

    first = await held_in_first_prefill(engine, probe, PROMPTS[0], GREEDY)
    rest = [ask(engine, text, GREEDY) for text in PROMPTS[1:]]
    await asyncio.sleep(0)  # let every task queue its request while the worker is busy
    assert engine.queue_depth == len(PROMPTS)
    probe.gate.set()
    joined = [generation.text for generation in await asyncio.gather(first, *rest)]
    assert probe.prefills == [1, len(PROMPTS) - 1]  # the late ones joined together at the next step
    assert max(probe.steps) == len(PROMPTS)
    assert joined == alone


async def test_a_late_short_request_finishes_while_the_long_one_goes_on(
    make_engine: MakeEngine, probe: ForwardProbe
) -> None:
    engine = await make_engine(max_batch_size=4)
    probe.hold_at_pass(3)  # the long reply's prefill and first steps, then the worker waits
    long = ask(engine, "tell me a long story", LONG)
    await probe.entered()
    short = ask(engine, "hi")
    await asyncio.sleep(0)
    probe.gate.set()
    assert (await asyncio.wait_for(short, WAIT_S)).text
    assert not long.done(), "the short reply waited for the long one"
    assert (await long).text
    assert probe.prefills == [1, 1]
    assert 2 in probe.steps and probe.steps[-1] == 1  # decoded side by side, then the long one alone


async def test_a_withdrawn_row_frees_its_slot_at_the_next_step(make_engine: MakeEngine, probe: ForwardProbe) -> None:
    engine = await make_engine(max_batch_size=1)
    probe.hold_at_pass(3)
    impatient = ask(engine, "tell me a long story", LONG)
    await probe.entered()
    waiting = ask(engine, "hi")
    await asyncio.sleep(0)
    assert engine.queue_depth == 2
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    probe.gate.set()
    assert (await asyncio.wait_for(waiting, WAIT_S)).text
    assert len(probe.steps) < LONG.max_new_tokens, "the waiting request got the slot only after the long reply"
    assert engine.queue_depth == 0


async def test_mixed_sampling_settings_in_one_batch(make_engine: MakeEngine, probe: ForwardProbe) -> None:
    engine = await make_engine(max_batch_size=4, seed=3)
    sampled = generation_params(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
    settings = [GREEDY, sampled, SHORT]
    alone = [(await engine.generate_response(chat("pizza?"), params=p)).text for p in settings]
    probe.forget()
    together = await asyncio.gather(*(engine.generate_response(chat("pizza?"), params=p) for p in settings))
    assert probe.prefills == [3]
    assert [g.text for g in together] == alone  # each row keeps its own settings and, seeded, its own draws


def reference_reply(engine: Engine, text: str, params: GenerationParams) -> str:
    """What transformers' own `generate` answers for `text` alone (greedy, the same processors)."""
    loaded = engine._loaded
    assert loaded is not None
    eos = loaded.tokenizer.eos_token_id
    ids = build_prompt_ids(
        chat(text), tokenizer=loaded.tokenizer, max_prompt_tokens=128 - params.max_new_tokens, history_turns=10
    )
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        repetition_penalty=params.repetition_penalty,
        pad_token_id=eos,
        eos_token_id=eos,
        begin_suppress_tokens=list(loaded.blank_ids),
    )
    with torch.inference_mode():
        output = loaded.model.generate(input_ids=torch.tensor([ids]), generation_config=config)  # type: ignore[operator]
    decoded = loaded.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
    return parse_reply(decoded.replace("\ufffd", ""), eos=loaded.tokenizer.eos_token)


async def test_greedy_answers_match_transformers_generate(make_engine: MakeEngine) -> None:
    engine = await make_engine(max_batch_size=8)
    texts = PROMPTS[:3]  # `generate` takes a second per reply here, even on the tiny model
    together = await asyncio.gather(*(engine.generate_response(chat(text)) for text in texts))
    assert [g.text for g in together] == [reference_reply(engine, text, GREEDY) for text in texts]


async def test_swap_between_steps_old_rows_finish_on_the_old_model_new_ones_start_at_once(
    make_engine: MakeEngine, probe: ForwardProbe, tiny_model_dir: Path
) -> None:
    engine = await make_engine(max_batch_size=8)
    old, new = engine.model_ref, ModelRef(str(tiny_model_dir), "v2", version_id=2)
    probe.forget()
    probe.hold_at_pass(3)
    before = [ask(engine, text, LONG) for text in PROMPTS[:2]]
    await probe.entered()
    swapping = asyncio.create_task(engine.swap(new))
    await probe.until(lambda p: len(p.loaded) == 2)  # loaded while the worker is held mid-decoding
    probe.gate.set()
    await asyncio.wait_for(swapping, WAIT_S)
    during = [ask(engine, text) for text in PROMPTS[2:]]
    assert [g.model for g in await asyncio.gather(*during)] == [new] * 3
    assert not any(task.done() for task in before), "new requests waited for the old model's rows"
    assert [g.model for g in await asyncio.gather(*before)] == [old] * 2
    assert engine.model_ref == new
    assert probe.load_threads[0] == "magpie-engine" != probe.load_threads[1]


async def test_full_queue_raises_busy_at_once(make_engine: MakeEngine, probe: ForwardProbe) -> None:
    engine = await make_engine(max_batch_size=1, queue_size=2)
    running = await held_in_first_prefill(engine, probe)
    waiting = [ask(engine, "two"), ask(engine, "three")]
    await asyncio.sleep(0)
    assert engine.queue_depth == 3
    with pytest.raises(EngineBusyError):
        await engine.generate_response(chat("four"), params=SHORT)
    probe.gate.set()
    assert all(g.text for g in await asyncio.gather(running, *waiting))
    assert engine.queue_depth == 0


async def test_a_timeout_mid_decoding_discards_only_that_reply(make_engine: MakeEngine, probe: ForwardProbe) -> None:
    engine = await make_engine(max_batch_size=2, batch_wait_ms=60_000)  # decoding starts once both are queued
    probe.hold_at_pass(1)
    impatient = ask(engine, "one", timeout=0.05)
    patient = ask(engine, "two")
    assert (await probe.entered()).rows == 2
    with pytest.raises(EngineTimeoutError):
        await impatient
    probe.gate.set()
    assert (await patient).text
    assert set(probe.steps) == {1}, "the timed-out row was still decoded"


async def test_a_cancelled_request_is_never_prefilled(make_engine: MakeEngine, probe: ForwardProbe) -> None:
    engine = await make_engine(max_batch_size=1)
    running = await held_in_first_prefill(engine, probe)
    doomed = ask(engine, "two")
    await asyncio.sleep(0)
    assert engine.queue_depth == 2
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert engine.queue_depth == 1
    probe.gate.set()
    assert (await running).text
    assert (await engine.generate_response(chat("three"), params=SHORT)).text
    assert probe.prefills == [1, 1]


async def test_close_fails_waiting_requests_and_finishes_the_rows_decoding(
    make_engine: MakeEngine, probe: ForwardProbe
) -> None:
    engine = await make_engine(max_batch_size=1)
    running = await held_in_first_prefill(engine, probe)
    waiting = ask(engine, "two")
    await asyncio.sleep(0)
    closing = asyncio.create_task(engine.close())
    with pytest.raises(EngineClosedError):
        await asyncio.wait_for(waiting, WAIT_S)
    probe.gate.set()
    assert isinstance(await running, Generation)
    await asyncio.wait_for(closing, WAIT_S)
    with pytest.raises(EngineClosedError):
        await engine.generate_response(chat("three"))
    assert engine.model_ref is None


async def test_stats_count_rows_and_tokens(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    await asyncio.gather(*(engine.generate_response(chat(text), params=LONG) for text in PROMPTS[:2]))
    stats = engine.stats()
    assert (stats.queue_depth, stats.batch_rows) == (0, 0)
    assert stats.tokens_generated == 2 * LONG.max_new_tokens
    assert stats.generate_seconds > 0
