"""The engine against a real tiny GPT-2 (n_positions=128), loaded through `from_pretrained`.

`tests.engine_probe` watches the worker's forward passes; continuous batching itself is in
`test_continuous_batching.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub.constants
import pytest
import torch

from core.errors import EngineClosedError, HubUnreachableError, ModelLoadError
from core.serving.dialogue import BOT_SPEAKER, Turn, format_dialogue
from core.serving.engine import (
    Engine,
    EngineConfig,
    GenerationParams,
    ModelRef,
    build_prompt_ids,
    hub_reachable,
    load_pretrained,
)
from core.serving.engine._loading import prepare
from core.serving.engine._sampling import RowDecoder
from core.settings import Settings
from tests.conftest import engine_config, generation_params
from tests.engine_probe import SHORT, ForwardProbe, make_engine, probe

__all__ = ["make_engine", "probe"]  # fixtures

UNICODE_TEXTS = ["안녕하세요, 오늘 기분이 어때요?", "좋아요! 날씨가 정말 좋네요 😀🍕", "שלום, מה שלומך?"]


def chat(text: str) -> list[Turn]:
    return [Turn("alice", "hello there, how are you today?"), Turn(BOT_SPEAKER, "I am fine."), Turn("alice", text)]


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
    make_engine: Callable[..., Awaitable[Engine]], probe: ForwardProbe
) -> None:
    forced = generation_params(max_new_tokens=64, min_new_tokens=64, temperature=0.0)
    engine = await make_engine(params=forced, history_turns=50)
    assert engine.context_window == 128
    turns = [Turn(f"user{i % 3}", "the quick brown fox jumps over the lazy dog " * 3) for i in range(40)]
    generation = await engine.generate_response(turns)  # without truncation the positions would overflow
    assert generation.text
    [prefill, *steps] = probe.passes
    assert len(steps) == 63  # max_new_tokens, whatever the prompt's length: the 64th token needs no step
    assert prefill.width + 64 <= 128


async def test_unicode_round_trip(make_engine: Callable[..., Awaitable[Engine]], tiny_model_dir: Path) -> None:
    _, tokenizer = load_pretrained(str(tiny_model_dir), "cpu")
    turns = [Turn(f"user{i}", text) for i, text in enumerate(UNICODE_TEXTS)]
    prompt = format_dialogue(turns, responder=BOT_SPEAKER, eos=tokenizer.eos_token)
    assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt

    engine = await make_engine(params=generation_params(max_new_tokens=24))
    generation = await engine.generate_response(turns)
    assert generation.text and "\ufffd" not in generation.text
    generation.text.encode("utf-8")  # a valid string: no lone surrogates


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


async def test_failed_swap_keeps_the_old_model(make_engine: Callable[..., Awaitable[Engine]], tmp_path: Path) -> None:
    engine = await make_engine()
    old = engine.model_ref
    with pytest.raises(ModelLoadError):
        await engine.swap(ModelRef(str(tmp_path / "missing"), "v3", version_id=3))
    assert engine.model_ref == old
    assert (await engine.generate_response(chat("still there?"), params=SHORT)).model == old


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
        serve_fp32_packed=False,
    )  # fmt: skip
    params = GenerationParams(
        max_new_tokens=12, temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.5, min_new_tokens=1
    )
    assert GenerationParams.from_settings(settings) == params
    assert Engine.from_settings(settings).config == EngineConfig(
        device="cpu", max_batch_size=3, queue_size=5, batch_wait_ms=7.5, timeout_s=9.0, torch_threads=2,
        history_turns=4, seed=11, params=params, precision="int8", fp32_packed=False,
    )  # fmt: skip
    with pytest.raises(ValueError):
        generation_params(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError):
        engine_config(queue_size=0)


def feed(loaded: Any, tokens: list[int], *, min_new: int = 1) -> RowDecoder:
    """A decoder that was made to choose `tokens` one by one (each as the only finite logit)."""
    params = generation_params(max_new_tokens=64, min_new_tokens=min_new, temperature=0.0, repetition_penalty=1.0)
    decoder = RowDecoder(loaded, [], params, seed=None)
    for token in tokens:
        assert not decoder.done
        logits = torch.full((len(loaded.tokenizer),), float("-inf"))
        logits[token] = 0.0
        assert decoder.choose(logits) == token
    return decoder


def test_a_row_stops_at_the_next_speaker_label(tiny_model_dir: Path) -> None:
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu")

    def stops(generated: str, *, min_new: int = 1) -> bool:
        return feed(loaded, loaded.tokenizer(generated)["input_ids"], min_new=min_new).done

    assert stops(" fine thanks\nUser 1:")
    assert stops(" fine thanks\nBot:")
    assert not stops(" fine thanks")
    assert not stops(" the time is 10:")  # a colon that ends no speaker label
    assert not stops(" fine thanks\nUser 1:", min_new=50)
    assert feed(loaded, loaded.tokenizer(" fine thanks\nUser 1:")["input_ids"]).text() == "fine thanks"


def test_sampler_draws_from_the_top_k_and_top_p_only() -> None:
    loaded = SimpleNamespace(context_window=128, tokenizer=SimpleNamespace(eos_token_id=0), blank_ids=(), colon_ids=())
    scores = torch.tensor([-9.0, 5.0, 4.0, 1.0, 3.0])

    def draws(**params: Any) -> list[int]:
        chosen = generation_params(temperature=1.0, repetition_penalty=1.0, **params)
        return [RowDecoder(loaded, [], chosen, seed=None).choose(scores) for _ in range(2000)]  # type: ignore[arg-type]

    torch.manual_seed(0)
    top_two = draws(top_k=2, top_p=1.0)
    assert set(top_two) == {1, 2}
    assert abs(top_two.count(1) / 2000 - 0.731) < 0.05  # e^5 / (e^5 + e^4)
    assert set(draws(top_k=0, top_p=0.5)) == {1}
