"""fp32 projections in oneDNN's packed layout (core/serving/engine/_packed.py): the same products, the same replies,
and the plain layout wherever packing does not apply or cannot be trusted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from core.serving.engine import ModelRef
from core.serving.engine._loading import prepare
from core.serving.engine._packed import PackedLinear, _checked, load_packed
from core.serving.engine._precision import _write_cache

IDS = torch.arange(5, 45)[None, :]
GREEDY = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}


def plain_model(directory: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(directory)
    return model.eval()


def packed_count(model: PreTrainedModel) -> int:
    return sum(isinstance(module, PackedLinear) for module in model.modules())


def test_packed_model_keeps_the_products_and_the_greedy_reply(tiny_model_dir: Path) -> None:
    plain, packed = plain_model(tiny_model_dir), load_packed(tiny_model_dir)
    assert packed is not None
    assert packed_count(packed) == 4 * len(packed.transformer.h) + 1, "every block projection and the LM head"
    assert not any(isinstance(module, Conv1D) for module in packed.modules()), "no float weight is kept twice"
    assert torch.equal(packed.transformer.wte.weight, plain.transformer.wte.weight), "the lookup stays plain"
    with torch.inference_mode():
        assert torch.allclose(packed(IDS).logits, plain(IDS).logits, atol=1e-5)
        assert torch.equal(packed.generate(IDS, **GREEDY), plain.generate(IDS, **GREEDY))


def test_fp32_serving_loads_packed_and_so_does_auto_once_it_chose_fp32(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "fp32")
    assert packed_count(loaded.model) == 4 * len(loaded.model.transformer.h) + 1
    assert loaded.precision == "fp32"
    version = tmp_path / "v1"
    shutil.copytree(tiny_model_dir, version)
    _write_cache(version, "cpu", "fp32", {"fp32": 1.0, "int8": 2.0})  # int8 failed the gate on this machine
    auto = prepare(ModelRef(str(version), "v1", version_id=1), "cpu", "auto")
    assert auto.precision == "fp32" and packed_count(auto.model) == 4 * len(auto.model.transformer.h) + 1


def test_serve_fp32_packed_false_serves_the_projections_as_loaded(tiny_model_dir: Path) -> None:
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "fp32", packed=False)
    assert packed_count(loaded.model) == 0 and any(isinstance(m, Conv1D) for m in loaded.model.modules())


def test_an_untied_head_is_packed_from_its_own_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = plain_model(tiny_model_dir)
    plain.config.tie_word_embeddings = False
    plain.lm_head.weight = torch.nn.Parameter(plain.lm_head.weight.detach().clone() * 0.5)
    plain.save_pretrained(tmp_path)
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    packed = load_packed(tmp_path)
    assert packed is not None
    with torch.inference_mode():
        assert torch.allclose(packed(IDS).logits, plain(IDS).logits, atol=1e-5)


def test_where_packing_does_not_apply_the_model_loads_plain(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert load_packed(tmp_path) is None, "no checkpoint"
    int8 = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "int8").model
    assert packed_count(int8) == 0


def test_a_packed_product_that_disagrees_is_refused(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = plain_model(tiny_model_dir).transformer.h[0].attn.c_attn.weight.t()
    assert isinstance(_checked(weight, None), PackedLinear)
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    with pytest.raises(ValueError, match="disagrees"):
        _checked(weight, None)
    assert load_packed(tiny_model_dir) is None
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "fp32")
    assert packed_count(loaded.model) == 0 and any(isinstance(m, Conv1D) for m in loaded.model.modules())


def test_without_the_kernels_the_model_serves_plain(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose internal oneDNN ops moved or went (they are not a public API)."""

    def missing(*args: object) -> torch.Tensor:
        raise RuntimeError("No such operator mkldnn::_reorder_linear_weight")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    assert load_packed(tiny_model_dir) is None
    loaded = prepare(ModelRef(str(tiny_model_dir), "tiny"), "cpu", "fp32")
    with torch.inference_mode():
        assert torch.equal(loaded.model(IDS).logits, plain_model(tiny_model_dir)(IDS).logits)
