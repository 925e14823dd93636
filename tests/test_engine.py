"""The engine against a real tiny GPT-2 (n_positions=128), loaded through `from_pretrained`.

`GenerateProbe` wraps the real model's `generate` to count calls and rows and, when a test closes its gate, to
hold the worker inside `generate`: that makes "the model is busy" a state the test controls instead of a race.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub.constants
import pytest
import torch

import core.engine._loading
from core.dialogue import BOT_SPEAKER, Turn, format_dialogue
from core.engine import (
    Engine,
    EngineConfig,
    Generation,
    GenerationParams,
    ModelRef,
    build_prompt_ids,
    hub_reachable,
    load_pretrained,
)
from core.engine._decoding import _EndOfTurn, _TopKTopPSampler
from core.engine._loading import prepare
from core.errors import EngineBusyError, EngineClosedError, EngineTimeoutError, HubUnreachableError, ModelLoadError
from core.settings import Settings
from tests.conftest import engine_config, generation_params

GREEDY = generation_params(max_new_tokens=16, temperature=0.0, repetition_penalty=2.0)
SHORT = generation_params(max_new_tokens=8, temperature=0.0, repetition_penalty=2.0)
UNICODE_TEXTS = ["안녕하세요, 오늘 기분이 어때요?", "좋아요! 날씨가 정말 좋네요 😀🍕", "שלום, מה שלומך?"]
WAIT_S = 10.0


def chat(text: str) -> list[Turn]:
    return [Turn("alice", "hello there, how are you today?"), Turn(BOT_SPEAKER, "I am fine."), Turn("alice", text)]


class GenerateProbe:
    """Stands in for `load_pretrained`: loads for real, then wraps the model's `generate` to observe the worker."""

    def __init__(self) -> None:
        self.batches: list[int] = []  # rows of each generate call
        self.shapes: list[tuple[int, int]] = []  # (prompt length, new tokens) of each generate call
        self.gate = threading.Event()  # cleared: generate waits inside the worker thread
        self.gate.set()
        self.load_threads: list[str] = []
        self._entered: queue.Queue[int] = queue.Queue()
        self._loaded: queue.Queue[str] = queue.Queue()

    def load(self, source: str, device: str) -> tuple[Any, Any]:
        model, tokenizer = load_pretrained(source, device)
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            rows = int(kwargs["input_ids"].shape[0])
            self.batches.append(rows)
            self._entered.put(rows)
            if not self.gate.wait(timeout=30):
                raise RuntimeError("the test never opened the gate")
            output = original(*args, **kwargs)
            prompt_length = int(kwargs["input_ids"].shape[1])
            self.shapes.append((prompt_length, int(output.shape[1]) - prompt_length))
            return output

        model.generate = generate
        self.load_threads.append(threading.current_thread().name)
        self._loaded.put(source)
        return model, tokenizer

    def forget_calls(self) -> None:
        self.batches.clear()
        while not self._entered.empty():
            self._entered.get_nowait()

    async def entered_generate(self) -> int:
        """Waits until the worker is inside `generate`; returns that batch's size."""
        return await asyncio.to_thread(self._entered.get, timeout=WAIT_S)

    async def finished_loading(self) -> str:
        return await asyncio.to_thread(self._loaded.get, timeout=WAIT_S)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> GenerateProbe:
    probe = GenerateProbe()
    monkeypatch.setattr(core.engine._loading, "load_pretrained", probe.load)
    return probe


@pytest.fixture
async def make_engine(tiny_model_dir: Path, probe: GenerateProbe) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    """Starts engines on the tiny model (seeded, greedy by default) and closes them after the test.

    One torch thread: for a model this small a second thread only adds OpenMP hand-offs, which stall for whole
    scheduler slices when the machine's two cores are shared.
    """
    engines: list[Engine] = []
    threads = torch.get_num_threads()

    async def make(**kwargs: Any) -> Engine:
        options: dict[str, Any] = {"seed": 0, "batch_wait_ms": 0.0, "params": GREEDY, "torch_threads": 1}
        options.update(kwargs)
        engine = Engine(engine_config(**options))
        engines.append(engine)
        await engine.start(ModelRef(str(tiny_model_dir), "tiny"))
        return engine

    yield make
    probe.gate.set()
    for engine in engines:
        await engine.close()
    torch.set_num_threads(threads)


async def test_reply_is_only_new_text(make_engine: Callable[..., Awaitable[Engine]]) -> None:
    engine = await make_engine(params=generation_params(max_new_tokens=32))
    turns = chat("the quick brown fox jumps over the lazy dog")
    generation = await engine.generate_response(turns)
    assert generation.text.strip() == generation.text != ""
    assert "quick brown fox" not in generation.text
    assert "User 1" not in generation.text and "I am fine" not in generation.text
    assert generation.model == engine.model_ref


def test_history_is_cut_from_the_left_in_whole_turns(tiny_model_dir: Path) -> None:
    _, tokenizer = load_pretrained(str(tiny_model_dir), "cpu")
    eos = tokenizer.eos_token
    turns = [Turn("alice" if i % 2 else BOT_SPEAKER, f"turn {i}: do you like pizza?") for i in range(40)]
    ids = build_prompt_ids(turns, tokenizer=tokenizer, max_prompt_tokens=100, history_turns=100)
    prompt = tokenizer.decode(ids)
    assert 0 < len(ids) <= 100
    assert prompt.endswith(f"turn 39: do you like pizza?{eos}Bot:")
    assert prompt.startswith(("Bot: turn ", "User 1: turn "))  # whole turns: the oldest kept starts with its label
    assert "turn 0:" not in prompt
    assert 1 < prompt.count(eos) < 40

    capped = tokenizer.decode(build_prompt_ids(turns, tokenizer=tokenizer, max_prompt_tokens=100, history_turns=1))
    assert capped == f"Bot: turn 38: do you like pizza?{eos}User 1: turn 39: do you like pizza?{eos}Bot:"


def test_one_turn_too_long_keeps_its_label_and_last_tokens(tiny_model_dir: Path) -> None:
    _, tokenizer = load_pretrained(str(tiny_model_dir), "cpu")
    eos = tokenizer.eos_token
    text = " ".join(f"word{i}" for i in range(300)) + " 안녕하세요 the end"
    ids = build_prompt_ids([Turn("alice", text)], tokenizer=tokenizer, max_prompt_tokens=40, history_turns=10)
    prompt = tokenizer.decode(ids)
    assert len(ids) == 40
    assert prompt.startswith("User 1:")
    assert prompt.endswith(f" 안녕하세요 the end{eos}Bot:")
    assert "word0 " not in prompt


async def test_long_history_still_fits_the_context_window(
    make_engine: Callable[..., Awaitable[Engine]], probe: GenerateProbe
) -> None:
    forced = generation_params(max_new_tokens=64, min_new_tokens=64, temperature=0.0)
    engine = await make_engine(params=forced, history_turns=50)
    assert engine.context_window == 128
    turns = [Turn(f"user{i % 3}", "the quick brown fox jumps over the lazy dog " * 3) for i in range(40)]
    generation = await engine.generate_response(turns)  # without truncation the positions would overflow
    assert generation.text
    [(prompt_length, new_tokens)] = probe.shapes
    assert new_tokens == 64  # max_new_tokens, whatever the prompt's length
    assert prompt_length + new_tokens <= 128


async def test_unicode_round_trip(make_engine: Callable[..., Awaitable[Engine]], tiny_model_dir: Path) -> None:
    _, tokenizer = load_pretrained(str(tiny_model_dir), "cpu")
    turns = [Turn(f"user{i}", text) for i, text in enumerate(UNICODE_TEXTS)]
    prompt = format_dialogue(turns, responder=BOT_SPEAKER, eos=tokenizer.eos_token)
    assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt

    engine = await make_engine(params=generation_params(max_new_tokens=24))
    generation = await engine.generate_response(turns)
    assert generation.text and "\ufffd" not in generation.text
    generation.text.encode("utf-8")  # a valid string: no lone surrogates


async def test_concurrent_requests_share_generate_calls(
    make_engine: Callable[..., Awaitable[Engine]], probe: GenerateProbe
) -> None:
    engine = await make_engine(max_batch_size=8)
    prompts = [*UNICODE_TEXTS, "what is your favourite colour?", "pizza or pasta?", "I like blue", "the sea"]
    one_by_one = [(await engine.generate_response(chat(text))).text for text in prompts]
    assert probe.batches == [1] * len(prompts)
    assert len(set(one_by_one)) > 1, "the prompts should lead to different answers"

    probe.forget_calls()
    probe.gate.clear()
    first = asyncio.create_task(engine.generate_response(chat(prompts[0])))
    assert await probe.entered_generate() == 1
    rest = [asyncio.create_task(engine.generate_response(chat(text))) for text in prompts[1:]]
    await asyncio.sleep(0)  # let every task queue its request while the model is busy
    assert engine.queue_depth == len(prompts)
    probe.gate.set()
    answers = [generation.text for generation in await asyncio.gather(first, *rest)]
    assert probe.batches == [1, len(prompts) - 1]
    assert answers == one_by_one


async def test_event_loop_keeps_running_during_generation(make_engine: Callable[..., Awaitable[Engine]]) -> None:
    engine = await make_engine(max_batch_size=8)
    forced = generation_params(max_new_tokens=48, min_new_tokens=48, temperature=0.8)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    await asyncio.gather(*(engine.generate_response(chat(text), params=forced) for text in UNICODE_TEXTS))
    during = ticks - before
    stop.set()
    await ticking
    assert during >= 10, f"the event loop ran only {during} times while the model generated"


async def test_swap_under_load(
    make_engine: Callable[..., Awaitable[Engine]], probe: GenerateProbe, tiny_model_dir: Path
) -> None:
    engine = await make_engine(max_batch_size=3, batch_wait_ms=60_000)  # a batch starts when 3 are queued
    old = engine.model_ref
    new = ModelRef(str(tiny_model_dir), "v2", version_id=2)
    await probe.finished_loading()

    probe.gate.clear()
    before = [asyncio.create_task(engine.generate_response(chat(t), params=SHORT)) for t in UNICODE_TEXTS]
    assert await probe.entered_generate() == len(UNICODE_TEXTS)
    swapping = asyncio.create_task(engine.swap(new))
    assert await probe.finished_loading() == new.source  # loaded while the worker is busy generating
    during = [asyncio.create_task(engine.generate_response(chat(t), params=SHORT)) for t in UNICODE_TEXTS]
    probe.gate.set()
    await asyncio.wait_for(swapping, WAIT_S)
    after = await asyncio.gather(*(engine.generate_response(chat(t), params=SHORT) for t in UNICODE_TEXTS))

    assert [g.model for g in await asyncio.gather(*before)] == [old] * 3
    assert [g.model for g in await asyncio.gather(*during)] == [new] * 3
    assert [g.model for g in after] == [new] * 3
    assert engine.model_ref == new
    assert probe.load_threads[0] == "magpie-engine" != probe.load_threads[1]


async def test_failed_swap_keeps_the_old_model(make_engine: Callable[..., Awaitable[Engine]], tmp_path: Path) -> None:
    engine = await make_engine()
    old = engine.model_ref
    with pytest.raises(ModelLoadError):
        await engine.swap(ModelRef(str(tmp_path / "missing"), "v3", version_id=3))
    assert engine.model_ref == old
    assert (await engine.generate_response(chat("still there?"), params=SHORT)).model == old


async def hold_worker(engine: Engine, probe: GenerateProbe) -> asyncio.Task[Generation]:
    """Starts a request and keeps the worker inside its `generate` until the test sets `probe.gate`."""
    probe.gate.clear()
    running = asyncio.create_task(engine.generate_response(chat("one"), params=SHORT))
    await probe.entered_generate()
    return running


async def queue_behind(engine: Engine, *texts: str) -> list[asyncio.Task[Generation]]:
    """Requests for `texts`, returned once each has joined the queue."""
    tasks = [asyncio.create_task(engine.generate_response(chat(text), params=SHORT)) for text in texts]
    await asyncio.sleep(0)  # let every task run up to its first await, which is after queueing
    return tasks


async def test_full_queue_raises_busy_at_once(
    make_engine: Callable[..., Awaitable[Engine]], probe: GenerateProbe
) -> None:
    engine = await make_engine(max_batch_size=1, queue_size=2)
    running = await hold_worker(engine, probe)
    waiting = await queue_behind(engine, "two", "three")
    assert engine.queue_depth == 3
    with pytest.raises(EngineBusyError):
        await engine.generate_response(chat("four"), params=SHORT)
    probe.gate.set()
    assert all(g.text for g in await asyncio.gather(running, *waiting))
    assert engine.queue_depth == 0


async def test_timeout_mid_batch_discards_only_that_reply(
    make_engine: Callable[..., Awaitable[Engine]], probe: GenerateProbe
) -> None:
    engine = await make_engine(max_batch_size=2, batch_wait_ms=60_000)  # the batch starts once both are queued
    probe.gate.clear()
    impatient = asyncio.create_task(engine.generate_response(chat("one"), params=SHORT, timeout=0.05))
    patient = asyncio.create_task(engine.generate_response(chat("two"), params=SHORT))
    assert await probe.entered_generate() == 2
    with pytest.raises(EngineTimeoutError):
        await impatient
    probe.gate.set()
    assert (await patient).text
    later = await asyncio.gather(*(engine.generate_response(chat(t), params=SHORT) for t in ("three", "four")))
    assert all(g.text for g in later)
    assert probe.batches == [2, 2]


async def test_cancelled_request_is_never_generated(
    make_engine: Callable[..., Awaitable[Engine]], probe: GenerateProbe
) -> None:
    engine = await make_engine(max_batch_size=1)
    running = await hold_worker(engine, probe)
    [doomed] = await queue_behind(engine, "two")
    assert engine.queue_depth == 2
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert engine.queue_depth == 1
    probe.gate.set()
    assert (await running).text
    assert (await engine.generate_response(chat("three"), params=SHORT)).text
    assert probe.batches == [1, 1]


async def test_close_fails_waiting_requests_and_finishes_the_running_batch(
    make_engine: Callable[..., Awaitable[Engine]], probe: GenerateProbe
) -> None:
    engine = await make_engine(max_batch_size=1)
    running = await hold_worker(engine, probe)
    [waiting] = await queue_behind(engine, "two")
    closing = asyncio.create_task(engine.close())
    with pytest.raises(EngineClosedError):
        await asyncio.wait_for(waiting, WAIT_S)
    probe.gate.set()
    assert isinstance(await running, Generation)
    await asyncio.wait_for(closing, WAIT_S)
    with pytest.raises(EngineClosedError):
        await engine.generate_response(chat("three"))
    assert engine.model_ref is None


async def test_seeded_sampling_is_reproducible(make_engine: Callable[..., Awaitable[Engine]]) -> None:
    sampled = generation_params(max_new_tokens=24, temperature=1.0)
    first = await make_engine(seed=7, params=sampled)
    second = await make_engine(seed=7, params=sampled)
    other = await make_engine(seed=8, params=sampled)
    replies = [(await engine.generate_response(chat("pizza?"))).text for engine in (first, second, first, other)]
    assert replies[0] == replies[1] == replies[2]
    assert replies[3] != replies[0]


async def test_generate_before_start_is_refused() -> None:
    with pytest.raises(EngineClosedError):
        await Engine(engine_config()).generate_response(chat("hello"))


async def test_missing_local_directory_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    engine = Engine(engine_config())
    with pytest.raises(ModelLoadError) as caught:
        await engine.start(ModelRef(str(missing), "v9", version_id=9))
    message = str(caught.value)
    assert "\n" not in message
    assert str(missing) in message and "does not exist" in message
    assert engine.model_ref is None
    await engine.close()


def test_unreachable_hub_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    with pytest.raises(ModelLoadError) as caught:
        load_pretrained("gpt2", "cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith('Model "gpt2" could not be loaded: the Hugging Face Hub is unreachable')
    assert "magpie bootstrap" in message


def test_an_unreachable_hub_is_detected_without_the_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HF_HUB_OFFLINE: a quick probe finds the (closed) endpoint and only the local cache is consulted."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:1")
    assert not hub_reachable()
    with pytest.raises(HubUnreachableError) as caught:
        load_pretrained("some-org/some-model-nobody-cached", "cpu")
    assert "unreachable" in str(caught.value) and "magpie bootstrap" in str(caught.value)


def test_directory_without_a_model_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_pretrained(str(tmp_path), "cpu")
    assert "\n" not in str(caught.value) and "save_pretrained" in str(caught.value)


def test_loaded_model_is_ready_for_batched_generation(tiny_model_dir: Path) -> None:
    model, tokenizer = load_pretrained(str(tiny_model_dir), "cpu")
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"
    assert not model.training
    assert model.device == torch.device("cpu")


def test_settings_reach_the_engine() -> None:
    """Every setting the engine reads, each away from its default, arrives where it is used."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, device="cpu", max_new_tokens=12, temperature=0.0, top_p=0.5, top_k=3,
        repetition_penalty=1.5, engine_max_batch_size=3, engine_queue_size=5, engine_batch_wait_ms=7.5,
        engine_timeout_s=9.0, torch_threads=2, history_turns=4, seed=11, serve_precision="int8",
    )  # fmt: skip
    params = GenerationParams(
        max_new_tokens=12, temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.5, min_new_tokens=1
    )
    assert GenerationParams.from_settings(settings) == params
    assert Engine.from_settings(settings).config == EngineConfig(
        device="cpu", max_batch_size=3, queue_size=5, batch_wait_ms=7.5, timeout_s=9.0, torch_threads=2,
        history_turns=4, seed=11, params=params, precision="int8",
    )  # fmt: skip
    with pytest.raises(ValueError):
        generation_params(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError):
        engine_config(queue_size=0)


def test_a_row_stops_at_the_next_speaker_label(tiny_model_dir: Path) -> None:
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu")
    prompt = loaded.tokenizer(f"User 1: hi{loaded.tokenizer.eos_token}Bot:")["input_ids"]

    def stops(generated: str, *, min_new: int = 1, withdrawn: bool = False) -> bool:
        ids = torch.tensor([prompt + loaded.tokenizer(generated)["input_ids"]])
        row = SimpleNamespace(turns=(), withdrawn=withdrawn)
        return bool(_EndOfTurn(loaded, [row], len(prompt), min_new)(ids, None)[0])

    assert stops(" fine thanks\nUser 1:")
    assert stops(" fine thanks\nBot:")
    assert not stops(" fine thanks")
    assert not stops(" the time is 10:")  # a colon that ends no speaker label
    assert not stops(" fine thanks\nUser 1:", min_new=50)
    assert stops(" fine", withdrawn=True)


def test_sampler_draws_from_the_top_k_and_top_p_only() -> None:
    scores = torch.tensor([[0.0, 5.0, 4.0, 1.0, 3.0]]).repeat(2000, 1)
    no_ids = torch.zeros((2000, 0), dtype=torch.long)
    torch.manual_seed(0)
    top_two = _TopKTopPSampler(generation_params(temperature=1.0, top_k=2, top_p=1.0))(no_ids, scores)
    assert bool((top_two.isfinite().sum(dim=-1) == 1).all()), "exactly one token may stay"
    chosen = top_two.argmax(dim=-1)
    assert set(chosen.tolist()) == {1, 2}
    assert abs((chosen == 1).float().mean().item() - 0.731) < 0.05  # e^5 / (e^5 + e^4)

    nucleus = _TopKTopPSampler(generation_params(temperature=1.0, top_k=0, top_p=0.5))(no_ids, scores)
    assert set(nucleus.argmax(dim=-1).tolist()) == {1}
