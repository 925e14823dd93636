"""fp32 projections served from oneDNN's packed weight layout (CPU).

Why: in fp32 on the CPU the matrix products are the whole step (GPT-2 small, 2 cores: 97% of a batch-of-8 step is
`addmm` and the LM head's `mm`), and BLAS reads each weight in its plain row-major layout at every call: for the
few rows a chat step has, a product is too small to amortise that, so a step of 8 rows cost ~3x a step of one. oneDNN
reorders each weight once into the blocked layout its kernels stream, and the same products then run at ~2x the
memory throughput and several times the arithmetic rate for a few rows (`bench/decode_step.py`, fused step: 1 row
23.4 -> 12.2 ms, 8 rows 53.0 -> 16.9 ms on a 2-core AVX-512 EPYC). The packed copy replaces each block's `Conv1D`, so
the float weights are not kept twice; the LM head gets its own packed copy (~150 MB for GPT-2 small) because the
embedding lookup still needs the table in its plain layout. The model is built from its checkpoint directly
(`load_packed`), never loaded plain first, so serving fp32 holds about what it did before (bench/serving_memory.py).

The kernel is torch's internal `mkldnn._linear_pointwise` (what `torch.compile` emits for a frozen fp32 linear on
the CPU). Internal ops can change between torch releases, so packing is checked when it is done: every packed
projection must agree with its plain product on a probe input (relative 1e-4), and where the ops are missing or
disagree, or the checkpoint is not a local GPT-2 `model.safetensors`, the model is loaded and served plain, as
before (one log line says why). Results differ from the plain product
by float rounding only (a different summation order, ~1e-6 on GPT-2 small's logits), like a batch of other size.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME

from core.serving.engine._precision import return_freed_memory

log = logging.getLogger(__name__)

_TOLERANCE = 1e-4
_ROWS_HINT = 8
"""The rows oneDNN lays the weights out for. Any count serves; measured on GPT-2 small's blocks (2 cores, AVX-512), a
layout for 8 rows costs 1 row the same as one laid out for 1 and halves the cost of 8 rows (14.7 -> 7.6 ms)."""
_BLOCK_PROJECTIONS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


class PackedLinear(nn.Module):
    """`x @ W.T + b` with `W` (out, in) held only in oneDNN's packed layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(size) for size in weight.shape)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def load_packed(directory: Path) -> PreTrainedModel | None:
    """The fp32 GPT-2 in `directory` with its projections packed, read from its `model.safetensors` one tensor at a
    time into a skeleton without weights; None where that does not apply (another architecture or checkpoint
    format, a key it cannot place) or a packed product disagrees with the plain one: the caller loads as usual.

    Tensor by tensor, each read through a mapping closed after it: a checkpoint mapped whole stays mapped, and
    counted in the resident set once read, while any one of its tensors lives, so packing from it held every
    weight twice (1.6 GB for GPT-2 small)."""
    path = directory / SAFE_WEIGHTS_NAME
    config = AutoConfig.from_pretrained(directory) if path.is_file() else None
    if config is None or config.model_type != "gpt2" or not _kernels_available():
        return None
    with torch.device("meta"):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    with safe_open(path, framework="pt") as checkpoint:  # reads the header only
        stored = {_model_key(key): key for key in checkpoint.keys()}  # noqa: SIM118 (not a dict)
    try:
        for parent, name in _projections(model):
            prefix = _module_path(model, parent, name)
            setattr(parent, name, _packed_projection(path, stored, prefix))
            return_freed_memory()  # each read's temporaries, so that they do not add up to the load's peak
        rest = {key: _read(path, stored[key]) for key in model.state_dict() if key in stored}
        model.load_state_dict(rest, strict=False, assign=True)
        if config.tie_word_embeddings:  # an untied head was packed with the blocks, from its own weights
            model.set_output_embeddings(_checked(model.transformer.wte.weight, None))  # type: ignore[no-untyped-call,union-attr,arg-type]
        return_freed_memory()
    except (KeyError, RuntimeError, ValueError) as exc:
        log.info("fp32 weights of %s serve in their plain layout: %s", directory, exc)
        return None
    if any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()]):
        log.info("fp32 weights of %s serve in their plain layout: the checkpoint leaves parts empty", directory)
        return None
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _projections(model: Any) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every block projection, and of the LM head when it has weights of its own."""
    found = [(block.get_submodule(owner), name) for block in model.transformer.h for owner, name in _BLOCK_PROJECTIONS]
    if not model.config.tie_word_embeddings:
        found.append((model, "lm_head"))
    return found


def _packed_projection(path: Path, stored: dict[str, str], prefix: str) -> PackedLinear:
    """One projection read from the checkpoint and packed (a `Conv1D` holds its weight as (in, out))."""
    weight = _read(path, stored[f"{prefix}.weight"])
    bias_key = stored.get(f"{prefix}.bias")
    bias = _read(path, bias_key) if bias_key is not None else None
    return _checked(weight if prefix == "lm_head" else weight.t(), bias)


def _checked(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
    """`weight` (out, in) packed, once its product is seen to agree with the plain one on a probe input."""
    packed = PackedLinear(weight, bias)
    probe = torch.randn(3, packed.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = functional.linear(probe, weight, bias), packed(probe)
    if not torch.allclose(got, expected, rtol=_TOLERANCE, atol=_TOLERANCE * float(expected.abs().max())):
        raise ValueError("a packed product disagrees with the plain one")
    return packed


def _read(path: Path, key: str) -> torch.Tensor:
    """One tensor, in fp32, through a mapping of the checkpoint that is closed again at once."""
    with safe_open(path, framework="pt") as checkpoint:
        tensor: torch.Tensor = checkpoint.get_tensor(key).to(torch.float32).clone()
    return tensor


def _model_key(key: str) -> str:
    """A checkpoint key as the model names it: GPT-2's original checkpoints omit the `transformer.` prefix."""
    return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"


def _module_path(model: nn.Module, parent: nn.Module, name: str) -> str:
    parent_path = next(path for path, module in model.named_modules() if module is parent)
    return f"{parent_path}.{name}" if parent_path else name


def _kernels_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")  # type: ignore[no-untyped-call]
