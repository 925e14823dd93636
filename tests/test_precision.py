"""SERVE_PRECISION: int8 and bf16 serving, and the loss gate `auto` uses at every load and swap."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

import core.serving.engine._loading as loading_module
import core.serving.engine._precision as precision_module
from core.serving.dialogue import Turn
from core.serving.engine import Engine, ModelRef, Precision
from core.serving.engine._converted import CONVERTED_FILE, CONVERTED_FILES
from core.serving.engine._loading import prepare
from core.serving.engine._precision import CACHE_FILE, gate_loss
from core.settings import Settings
from tests.conftest import engine_config, generation_params

PROMPTS = (
    [Turn("user:1", "hello there, how are you today?")],
    [Turn("user:1", "what is your favourite colour?")],
    [Turn("user:1", "안녕하세요"), Turn("bot", "좋아요!"), Turn("user:1", "pizza or pasta?")],
)


def _version_copy(source: Path, destination: Path, *, sharpen: float = 1.0, break_int8: bool = False) -> Path:
    """A copy of the tiny model as a version directory, optionally changed so that int8 rounding matters.

    `sharpen` scales the (tied) embeddings, so the logits are no longer nearly uniform and the loss reacts to the
    blocks at all. `break_int8` gives each MLP one hidden unit with a huge bias whose output weights are zero: fp32
    ignores it, but dynamic int8 quantizes the MLP's activations per tensor, so that unit sets the scale and every
    other activation rounds to zero. The MLP's output is scaled up so losing it shows in the loss.
    """
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.transformer.wte.weight *= sharpen
        if break_int8:
            for block in model.transformer.h:
                block.mlp.c_fc.bias[0] = 1e4
                block.mlp.c_proj.weight[0] = 0.0
                block.mlp.c_proj.weight[1:] *= 30
    shutil.copytree(source, destination)
    model.save_pretrained(destination)
    return destination


@asynccontextmanager
async def _engine(source: Path, precision: Precision, version_id: int | None = 1) -> AsyncIterator[Engine]:
    engine = Engine(
        engine_config(params=generation_params(max_new_tokens=6, temperature=0.0), seed=0, precision=precision)
    )
    await engine.start(ModelRef(str(source), source.name, version_id))
    try:
        yield engine
    finally:
        await engine.close()


async def _answers(engine: Engine, prompts: Sequence[list[Turn]] = PROMPTS) -> list[str]:
    return [(await engine.generate_response(turns)).text for turns in prompts]


def _quantized(model: nn.Module) -> bool:
    return any(isinstance(module, torch.ao.nn.quantized.dynamic.Linear) for module in model.modules())


async def test_fp32_serves_the_model_as_loaded(tiny_model_dir: Path) -> None:
    """The weights as loaded; the projections only change layout (core/serving/engine/_packed.py)."""
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "fp32")
    assert loaded.precision == "fp32"
    assert not _quantized(loaded.model)
    assert not any(isinstance(module, Conv1D) for module in loaded.model.modules())
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    served = loaded.model.state_dict()
    for name, tensor in reference.state_dict().items():
        if name in served:  # the embeddings, norms and biases; a packed weight is not a plain tensor any more
            assert torch.equal(served[name], tensor), name
    ids = torch.arange(5, 40)[None, :]
    with torch.inference_mode():
        assert torch.allclose(loaded.model(ids).logits, reference(ids).logits, atol=1e-5)


async def test_int8_quantizes_the_blocks_and_answers_like_fp32(tiny_model_dir: Path) -> None:
    """Greedy answers, each prompt served alone, agree on the tiny model. They may legitimately differ where two
    tokens' logits are closer than int8 rounding (the sharper check below bounds that instead: top-1 agreement on
    a whole dialogue), and between a prompt alone and in a batch, since dynamic int8 picks one activation scale
    per batch tensor."""
    async with _engine(tiny_model_dir, "fp32", None) as fp32, _engine(tiny_model_dir, "int8", None) as int8:
        assert (fp32.precision, int8.precision) == ("fp32", "int8")
        assert await _answers(int8) == await _answers(fp32)
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "int8")
    model = loaded.model
    assert _quantized(model.transformer.h[0]) and not any(isinstance(m, Conv1D) for m in model.modules())
    assert _quantized(model.lm_head), "the LM head is a third of GPT-2 small's weights"
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(model.transformer.wte.weight, reference.transformer.wte.weight), "the lookup stays fp32"


def test_int8_keeps_the_top_token_on_a_sharper_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    sharp = _version_copy(tiny_model_dir, tmp_path / "sharp", sharpen=10.0)
    fp32 = prepare(ModelRef(str(sharp), "sharp"), "cpu", "fp32")
    int8 = prepare(ModelRef(str(sharp), "sharp"), "cpu", "int8")
    ids = fp32.tokenizer(" ".join(text for turns in PROMPTS for turn in turns for text in [turn.text]))["input_ids"]
    batch = torch.tensor([ids])
    with torch.inference_mode():
        expected, got = fp32.model(batch).logits.argmax(-1), int8.model(batch).logits.argmax(-1)
    assert float((expected == got).float().mean()) >= 0.95


async def test_auto_serves_int8_when_it_keeps_the_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    version = _version_copy(tiny_model_dir, tmp_path / "good", sharpen=10.0)
    async with _engine(version, "auto") as engine:
        assert engine.precision == "int8"
    cached = json.loads((version / CACHE_FILE).read_text())
    (verdict,) = cached["machines"].values()
    assert verdict["precision"] == "int8"
    assert verdict["gate_losses"]["int8"] <= verdict["gate_losses"]["fp32"] * 1.02


async def test_auto_falls_back_to_fp32_when_int8_rounding_breaks_the_model(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)  # int8 is the only other candidate
    version = _version_copy(tiny_model_dir, tmp_path / "bad", sharpen=10.0, break_int8=True)
    assert gate_loss(prepare(ModelRef(str(version), "bad"), "cpu", "int8").model, _tokenizer(version)) > 1.1 * (
        gate_loss(prepare(ModelRef(str(version), "bad"), "cpu", "fp32").model, _tokenizer(version))
    ), "the construction must really break int8"
    async with _engine(version, "fp32") as fp32:
        expected = await _answers(fp32)
    async with _engine(version, "auto") as engine:
        assert engine.precision == "fp32"
        assert await _answers(engine) == expected, "the fallback serves the untouched fp32 weights"
    loaded = prepare(ModelRef(str(version), "bad", 1), "cpu", "auto")
    assert loaded.precision == "fp32" and not _quantized(loaded.model)


def _tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    return prepare(ModelRef(str(directory), "t"), "cpu", "fp32").tokenizer


async def test_the_verdict_is_cached_per_version(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _version_copy(tiny_model_dir, tmp_path / "v1", sharpen=10.0)
    assert prepare(ModelRef(str(version), "v1", 1), "cpu", "auto").precision == "int8"
    assert (version / CACHE_FILE).exists()

    def no_measuring(*_: object) -> float:
        raise AssertionError("the cached verdict should have been used")

    monkeypatch.setattr(precision_module, "gate_loss", no_measuring)
    assert prepare(ModelRef(str(version), "v1", 1), "cpu", "auto").precision == "int8"
    with pytest.raises(AssertionError):  # another version has no verdict yet, and a base model is never cached
        prepare(ModelRef(str(_version_copy(tiny_model_dir, tmp_path / "v2")), "v2", 2), "cpu", "auto")
    with pytest.raises(AssertionError):
        prepare(ModelRef(str(version), "base"), "cpu", "auto")


async def test_auto_takes_bf16_when_int8_breaks_on_a_cpu_with_native_bf16(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    version = _version_copy(tiny_model_dir, tmp_path / "bad", sharpen=10.0, break_int8=True)
    loaded = prepare(ModelRef(str(version), "bad", 1), "cpu", "auto")
    assert loaded.precision == "bf16" and not _quantized(loaded.model)
    verdict = json.loads((version / CACHE_FILE).read_text())["machines"]
    assert [v["precision"] for v in verdict.values()] == ["bf16"]


async def test_a_swap_passes_the_gate_before_serving(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    good = _version_copy(tiny_model_dir, tmp_path / "good", sharpen=10.0)
    bad = _version_copy(tiny_model_dir, tmp_path / "bad", sharpen=10.0, break_int8=True)
    async with _engine(good, "auto") as engine:
        assert engine.precision == "int8"
        await engine.swap(ModelRef(str(bad), "bad", 2))
        assert engine.precision == "fp32"
        assert (await engine.generate_response(PROMPTS[0])).model.name == "bad"
    assert json.loads((bad / CACHE_FILE).read_text())["machines"]


async def test_bf16_is_refused_without_native_bf16(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="core.serving.engine._precision"):
        async with _engine(tiny_model_dir, "bf16", None) as engine:
            assert engine.precision == "fp32"
    assert "SERVE_PRECISION=bf16 is not available, serving fp32: this CPU has no native bf16" in caplog.text


async def test_bf16_serves_where_the_cpu_has_it(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)  # as on an AVX512-BF16 / AMX CPU
    async with _engine(tiny_model_dir, "bf16", None) as engine:
        assert engine.precision == "bf16"
        assert all(await _answers(engine))
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "bf16")
    assert loaded.model.dtype == torch.bfloat16


def test_int8_is_refused_off_the_cpu_and_for_unknown_layers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert precision_module.unsupported("int8", "cuda", model) is not None
    assert precision_module.unsupported("int8", "cpu", model) is None
    model.transformer.h = nn.Sequential()  # as an architecture whose blocks the converter does not know
    assert precision_module.unsupported("int8", "cpu", model) is not None


def test_auto_is_the_default() -> None:
    assert Settings(_env_file=None).serve_precision == "auto"  # type: ignore[call-arg]


def _counting_gate(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the loss gate's measurements (a cached verdict makes none)."""
    calls: list[int] = []
    real = precision_module.gate_loss

    def counted(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> float:
        calls.append(1)
        return real(model, tokenizer)  # type: ignore[arg-type]

    monkeypatch.setattr(precision_module, "gate_loss", counted)
    return calls


def test_auto_decides_once_says_why_and_redecides_on_another_cpu(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    version = _version_copy(tiny_model_dir, tmp_path / "v1", sharpen=10.0)
    calls = _counting_gate(monkeypatch)
    with caplog.at_level(logging.INFO, logger="core.serving.engine"):
        assert prepare(ModelRef(str(version), "v1", 1), "cpu", "auto").precision == "int8"
    picked = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SERVE_PRECISION=auto picked")]
    assert len(picked) == 1 and "int8" in picked[0] and "2% gate" in picked[0], caplog.text
    assert calls == [1, 1], "fp32's loss, then int8's"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="core.serving.engine"):
        assert prepare(ModelRef(str(version), "v1", 1), "cpu", "auto").precision == "int8"
    assert calls == [1, 1], "a restart reuses the verdict"
    assert "decided earlier for this version on this machine" in caplog.text

    monkeypatch.setattr(precision_module, "cpu_capability", lambda: "DEFAULT:-")  # the same version, another CPU
    assert prepare(ModelRef(str(version), "v1", 1), "cpu", "auto").precision == "int8"
    assert calls == [1, 1, 1, 1], "another CPU decides again"
    assert len(json.loads((version / CACHE_FILE).read_text())["machines"]) == 2


def test_int8_is_kept_with_the_version_and_loads_without_the_float_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _version_copy(tiny_model_dir, tmp_path / "v1", sharpen=10.0)
    converted = prepare(ModelRef(str(version), "v1", 1), "cpu", "auto")
    assert converted.precision == "int8" and (version / CONVERTED_FILE).is_file()

    def no_float_checkpoint(*_: object, **__: object) -> None:
        raise AssertionError("the float checkpoint was loaded")

    monkeypatch.setattr(loading_module, "load_pretrained", no_float_checkpoint)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_float_checkpoint)
    for requested in ("auto", "int8"):
        direct = prepare(ModelRef(str(version), "v1", 1), "cpu", cast("Precision", requested))
        assert (
            direct.precision == "int8"
            and _quantized(direct.model.transformer.h[0])
            and _quantized(direct.model.lm_head)
        )
        assert not any(t.is_meta for t in [*direct.model.parameters(), *direct.model.buffers()])
        ids = torch.tensor([direct.tokenizer("hello there, how are you today?")["input_ids"]])
        with torch.inference_mode():
            assert torch.equal(direct.model(ids).logits, converted.model(ids).logits)


def test_stored_int8_from_another_machine_is_converted_again(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _version_copy(tiny_model_dir, tmp_path / "v1")
    prepare(ModelRef(str(version), "v1", 1), "cpu", "int8")
    stored = (version / CONVERTED_FILE).stat().st_mtime_ns
    monkeypatch.setattr(precision_module, "cpu_capability", lambda: "DEFAULT:-")
    loads: list[str] = []
    real = loading_module.load_pretrained
    monkeypatch.setattr(loading_module, "load_pretrained", lambda s, d: loads.append(s) or real(s, d))
    assert prepare(ModelRef(str(version), "v1", 1), "cpu", "int8").precision == "int8"
    assert loads == [str(version)], "converted from the float checkpoint again"
    assert (version / CONVERTED_FILE).stat().st_mtime_ns != stored, "and kept for this machine"


def test_bf16_is_kept_with_the_version_too(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    version = _version_copy(tiny_model_dir, tmp_path / "v1")
    converted = prepare(ModelRef(str(version), "v1", 1), "cpu", "bf16")
    assert converted.precision == "bf16" and (version / CONVERTED_FILES["bf16"]).is_file()

    def no_float_checkpoint(*_: object, **__: object) -> None:
        raise AssertionError("the float checkpoint was loaded")

    monkeypatch.setattr(loading_module, "load_pretrained", no_float_checkpoint)
    direct = prepare(ModelRef(str(version), "v1", 1), "cpu", "bf16")
    assert direct.precision == "bf16" and direct.model.dtype == torch.bfloat16
    ids = torch.tensor([direct.tokenizer("hello there, how are you today?")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(direct.model(ids).logits, converted.model(ids).logits)
