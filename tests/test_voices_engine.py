"""Voices in the engine: peft LoRA adapters by name, applied per row, so rows of several voices share a batch.

The adapters are real peft adapters on the tiny GPT-2 (random, non-zero B so each voice answers differently),
saved with `save_pretrained`; the reference for "what the voice says" is peft's own merge of the adapter into the
base, served alone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import core.serving.engine._precision as precision_module
from core.errors import EngineError, ModelLoadError
from core.ops.telemetry import EngineCollector
from core.serving.dialogue import Turn
from core.serving.engine import (
    Engine,
    Generation,
    GenerationParams,
    ModelRef,
    Precision,
    UnknownVoiceError,
    VoiceLoadError,
    VoiceRef,
)
from core.serving.engine._loading import prepare
from core.serving.engine._voices import VoicedLayer, VoiceRouting, attach, read_adapter
from tests.conftest import TINY_CORPUS, generation_params
from tests.engine_probe import GREEDY, SHORT, WAIT_S, ForwardProbe, make_engine, probe
from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer

__all__ = ["make_engine", "probe"]  # fixtures

MakeEngine = Callable[..., Awaitable[Engine]]
LONG = generation_params(max_new_tokens=24, min_new_tokens=24, temperature=0.0, repetition_penalty=2.0)
PROMPTS = ("hello there, how are you today?", "pizza or pasta?", "I like blue")


@dataclass(frozen=True)
class Voices:
    """Adapter directories on the tiny model: `a`, `b` (all projections, rank 4), `c` (attention only, rank 2),
    `a2` (a retrained `a`), and `a_merged`: peft's merge of `a` into the base, saved as a model."""

    a: Path
    b: Path
    c: Path
    a2: Path
    a_merged: Path


def _adapter(
    base: Path, out: Path, *, seed: int, rank: int = 4, targets: Sequence[str] = ("c_attn", "c_proj", "c_fc")
) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), fan_in_fan_out=True, init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def _merged(base: Path, adapter: Path, out: Path) -> Path:
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def voices(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Voices:
    root = tmp_path_factory.mktemp("voices")
    a = _adapter(tiny_model_dir, root / "a", seed=1)
    return Voices(
        a=a,
        b=_adapter(tiny_model_dir, root / "b", seed=2),
        c=_adapter(tiny_model_dir, root / "c", seed=3, rank=2, targets=("c_attn",)),
        a2=_adapter(tiny_model_dir, root / "a2", seed=4),
        a_merged=_merged(tiny_model_dir, a, root / "a-merged"),
    )


def chat(text: str) -> list[Turn]:
    return [Turn("alice", text)]


def ask(engine: Engine, text: str, voice: str | None, params: GenerationParams = SHORT) -> asyncio.Task[Generation]:
    return asyncio.create_task(engine.generate_response(chat(text), params=params, voice=voice))


async def solo(engine: Engine, text: str, voice: str | None, params: GenerationParams = SHORT) -> str:
    return (await engine.generate_response(chat(text), params=params, voice=voice)).text


async def test_a_voice_answers_as_its_adapter_merged_into_the_base(make_engine: MakeEngine, voices: Voices) -> None:
    engine = await make_engine()
    base = [await solo(engine, text, None, GREEDY) for text in PROMPTS]
    await engine.load_voice("a", voices.a)
    merged = await make_engine()
    await merged.swap(ModelRef(str(voices.a_merged), "a-merged"))
    voiced = [await engine.generate_response(chat(text), params=GREEDY, voice="a") for text in PROMPTS]
    assert [g.text for g in voiced] == [await solo(merged, text, None, GREEDY) for text in PROMPTS]
    assert [g.text for g in voiced] != base, "the adapter should change the answers"
    assert {(g.voice.name, g.voice.source) for g in voiced if g.voice} == {("a", str(voices.a))}
    assert engine.voices["a"].source == str(voices.a) and engine.stats().voices_loaded == 1


async def test_rows_of_several_voices_and_the_base_share_one_batch(
    make_engine: MakeEngine, probe: ForwardProbe, voices: Voices
) -> None:
    """Each row answers as it does alone; the base rows exactly as the model without any voice loaded."""
    engine = await make_engine(max_batch_size=12)
    base = {text: await solo(engine, text, None) for text in PROMPTS}
    for name in ("a", "b", "c"):
        await engine.load_voice(name, getattr(voices, name))
    rows = [(voice, text) for voice in ("a", None, "b", "c") for text in PROMPTS]
    alone = {row: base[row[1]] if row[0] is None else await solo(engine, row[1], row[0]) for row in rows}
    assert len({alone[(voice, PROMPTS[0])] for voice in ("a", "b", "c", None)}) == 4, "voices should differ"

    probe.forget()
    probe.hold_at_pass(1)
    first = ask(engine, rows[0][1], rows[0][0])
    await probe.entered()
    rest = [ask(engine, text, voice) for voice, text in rows[1:]]
    await asyncio.sleep(0)
    probe.gate.set()
    together = await asyncio.gather(first, *rest)
    assert probe.prefills == [1, len(rows) - 1] and max(probe.steps) == len(rows)
    assert [g.text for g in together] == [alone[row] for row in rows]
    assert [g.voice.name if g.voice else None for g in together] == [voice for voice, _ in rows]


async def test_replacing_a_voice_between_steps_leaves_rows_already_decoding_on_the_old_adapter(
    make_engine: MakeEngine, probe: ForwardProbe, voices: Voices
) -> None:
    engine = await make_engine(max_batch_size=4)
    await engine.load_voice("a", voices.a)
    await engine.load_voice("retrained", voices.a2)
    old_long = await solo(engine, "tell me a story", "a", LONG)
    new_short = await solo(engine, PROMPTS[0], "retrained")
    new_long = await solo(engine, "tell me a story", "retrained", LONG)

    probe.forget()
    probe.hold_at_pass(3)  # the long row's prefill and first steps, then the worker waits
    long = ask(engine, "tell me a story", "a", LONG)
    await probe.entered()
    await engine.load_voice("a", voices.a2)
    short = ask(engine, PROMPTS[0], "a")
    await asyncio.sleep(0)
    probe.gate.set()
    assert (await long).text == old_long and (await long).voice.source == str(voices.a)  # type: ignore[union-attr]
    assert (await short).text == new_short and (await short).voice.source == str(voices.a2)  # type: ignore[union-attr]

    probe.forget()
    probe.hold_at_pass(3)
    still = ask(engine, "tell me a story", "a", LONG)
    await probe.entered()
    queued = ask(engine, PROMPTS[1], "retrained")  # waits in the queue while the worker is held
    await asyncio.sleep(0)
    await engine.unload_voice("a")
    await engine.unload_voice("retrained")
    await engine.unload_voice("never-loaded")  # nothing to do, no error
    with pytest.raises(UnknownVoiceError):
        await engine.generate_response(chat(PROMPTS[0]), voice="a")
    probe.gate.set()
    assert (await asyncio.wait_for(still, WAIT_S)).text == new_long, "a row decoding finishes on its adapter"
    with pytest.raises(UnknownVoiceError):
        await asyncio.wait_for(queued, WAIT_S)  # unloaded before it started
    assert engine.voices == {} and engine.stats().voices_loaded == 0
    assert (await engine.generate_response(chat(PROMPTS[0]))).voice is None


async def test_an_unknown_voice_is_refused_at_once(engine: Engine) -> None:
    with pytest.raises(UnknownVoiceError) as refused:
        await engine.generate_response(chat("hi"), voice="nobody")
    assert isinstance(refused.value, EngineError) and engine.queue_depth == 0


async def test_adapters_that_cannot_serve_are_refused_and_the_voice_keeps_its_old_adapter(
    engine: Engine, voices: Voices, tmp_path: Path
) -> None:
    await engine.load_voice("a", voices.a)
    before = (await engine.generate_response(chat(PROMPTS[0]), voice="a")).text
    tokenizer = train_tokenizer(TINY_CORPUS * 20, vocab_size=400)
    other_base = save_model(
        build_model(tokenizer, ModelShape(n_layer=2, n_embd=32, n_head=2, n_positions=128), seed=0),
        tokenizer,
        tmp_path / "other-base",
    )
    dora = _adapter(other_base, tmp_path / "dora", seed=5)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cases = {
        tmp_path / "missing": "could not be read",
        _adapter(other_base, tmp_path / "other", seed=5): "does not fit",
        dora: "use_dora",
    }
    for directory, reason in cases.items():
        with pytest.raises(VoiceLoadError, match=reason) as refused:
            await engine.load_voice("a", directory)
        assert isinstance(refused.value, ModelLoadError)
    assert (await engine.generate_response(chat(PROMPTS[0]), voice="a")).text == before


async def test_voices_follow_a_swap_of_the_base(make_engine: MakeEngine, voices: Voices, tiny_model_dir: Path) -> None:
    engine = await make_engine()
    await engine.load_voice("a", voices.a)
    before = await solo(engine, PROMPTS[0], "a")
    await engine.swap(ModelRef(str(tiny_model_dir), "tiny-again"))
    after = await engine.generate_response(chat(PROMPTS[0]), params=SHORT, voice="a")
    assert after.text == before and after.model.name == "tiny-again"


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_the_delta_stays_fp32_on_top_of_an_int8_or_bf16_layer(
    tiny_model_dir: Path, voices: Voices, precision: Precision, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A voiced pass differs from peft's fp32 merge only by the base layers' rounding: a few percent of what the
    adapter changes, with the same top tokens."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)  # as on an AVX512-BF16 / AMX CPU
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", precision)
    assert loaded.precision == precision
    adapter = read_adapter(VoiceRef("a", str(voices.a)), loaded.model)
    routing = VoiceRouting()
    attach(loaded.model, adapter, routing)
    layers = [module for module in loaded.model.modules() if isinstance(module, VoicedLayer)]
    if precision == "int8":
        assert layers and all(isinstance(m.base, torch.ao.nn.quantized.dynamic.Linear) for m in layers)
    else:
        assert layers and all(m.base.weight.dtype == torch.bfloat16 for m in layers)
    assert all(a.dtype == b.dtype == torch.float32 for a, b in adapter.factors.values())
    ids = loaded.tokenizer(" ".join(PROMPTS), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(voices.a_merged)(ids).logits
        routing.route([adapter], "cpu")
        voiced = loaded.model(ids).logits.float()
        routing.route([None], "cpu")
        plain = loaded.model(ids).logits.float()
    assert float((voiced - expected).abs().mean()) < 0.05 * float((plain - expected).abs().mean())
    assert torch.equal(voiced.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("precision", ["int8", "bf16"])
async def test_a_batch_of_voices_serves_in_int8_and_bf16(
    make_engine: MakeEngine, voices: Voices, precision: Precision, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row gets its own voice. Rows are not compared with themselves alone: int8 picks one activation scale
    per batch and bf16 sums in another order, so a near-tie may go the other way (see `_precision`)."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    engine = await make_engine(precision=precision, max_batch_size=12)
    assert engine.precision == precision
    await engine.load_voice("a", voices.a)
    await engine.load_voice("c", voices.c)
    rows = [(voice, text) for voice in ("a", "c", None) for text in PROMPTS]
    together = await asyncio.gather(*(ask(engine, text, voice) for voice, text in rows))
    assert all(g.text for g in together)
    assert [g.voice.name if g.voice else None for g in together] == [voice for voice, _ in rows]
    assert len({g.text for g in together[:: len(PROMPTS)]}) == 3, "each voice answers the first prompt its way"


async def test_the_loaded_voices_are_a_metric(engine: Engine, voices: Voices) -> None:
    await engine.load_voice("a", voices.a)
    await engine.load_voice("b", voices.b)
    metrics = {metric.name: metric for metric in EngineCollector(engine).collect()}
    assert metrics["magpie_engine_voices_loaded"].samples[0].value == 2
    assert engine.stats().voice_bytes == sum(
        a.nbytes + b.nbytes for name in ("a", "b") for a, b in engine._voices[name].factors.values()
    )
