"""A fused GPT-2 decoding step: one token per row through the model as plain tensor operations.

Why: at batch 1 (a lone chat) in int8 the quantized matmuls are only about half of a step; the rest is Python,
~150 module calls plus transformers' per-call machinery (argument checks, the causal-mask builder, cache
wrappers, output dataclasses). The weights are read once per step whatever the batch, so this overhead is what
separates a lone user from the memory-bandwidth floor. The step below does the same arithmetic with the same
operations in the same order as transformers' GPT-2 (Conv1D's `addmm`, `layer_norm`, `gelu_new`'s formula, SDPA
with a boolean padding mask, skipped when no row has padding), so its logits are bitwise those of the model call
and greedy replies do not change.

It is used for single-token steps only (prefill stays transformers'), for GPT-2-shaped models whose every
module it recognises (fp32 `Conv1D`/`Linear`, their oneDNN-packed form `_packed.PackedLinear`, or torch's dynamic
int8 `Linear`); anything else (another architecture, a wrapped or adapted projection, an attention variant) falls
back to the model call.

Why not `torch.compile` (gcc is present here; tried on this step, 2026-12-06): with the step fused, a profile of
GPT-2 small in int8 at batch 1 puts 92% of the step's CPU time in `quantized::linear_dynamic` (the int8 matmuls
themselves), so compiling the rest could win at most ~8%; dynamo cannot trace the int8 modules' packed weights
(a graph break at every projection: "Failed to convert args/kwargs to proxy" on the ScriptObject), and the first
step of the tiny 2-layer test model took 37 s to compile on this shared 2-core machine (each new batch size or
cache length recompiles unless shapes are dynamic). There is no compile step, so nothing delays start-up: the
fused step is built (microseconds) with each cohort's KV batch. See docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers.pytorch_utils import Conv1D

from core.serving.engine._packed import PackedLinear

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]
_QuantizedLinear = torch.ao.nn.quantized.dynamic.Linear
_KNOWN_PROJECTIONS = (Conv1D, nn.Linear, _QuantizedLinear, PackedLinear)
_GELU_C = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True, slots=True)
class _Block:
    ln_1: nn.LayerNorm
    qkv: Linear
    out: Linear
    ln_2: nn.LayerNorm
    fc: Linear
    proj: Linear


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What `KVBatch` reads from a model call: the logits, (rows, 1, vocabulary)."""

    logits: torch.Tensor


class FusedStep:
    """The decoding step of one GPT-2 model; build with `fused_step`, which says None when it does not apply."""

    def __init__(self, model: Any, blocks: list[_Block], head: Linear) -> None:
        transformer = model.transformer
        self._wte: nn.Embedding = transformer.wte
        self._wpe: nn.Embedding = transformer.wpe
        self._ln_f: nn.LayerNorm = transformer.ln_f
        self._blocks = blocks
        self._head = head
        self._heads = int(model.config.n_head)
        self._scaling = (int(model.config.n_embd) // self._heads) ** -0.5

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, layers: Sequence[Any]
    ) -> torch.Tensor:
        """Next-token logits (rows, 1, vocabulary) for `tokens` (rows, 1) at `positions` (rows, 1); `mask` (rows,
        width) covers the cache after this step's column; `layers` are the cache's layers, updated in place."""
        hidden = self._wte(tokens) + self._wpe(positions)
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        rows = hidden.shape[0]
        for block, layer in zip(self._blocks, layers, strict=True):
            hidden = self._block(block, layer, hidden, attend, rows)
        return self._head(_norm(self._ln_f, hidden))

    def _block(
        self, block: _Block, layer: Any, hidden: torch.Tensor, attend: torch.Tensor | None, rows: int
    ) -> torch.Tensor:
        query, key, value = torch.split(block.qkv(_norm(block.ln_1, hidden)), hidden.shape[-1], dim=2)
        query, key, value = (t.view(rows, 1, self._heads, -1).transpose(1, 2) for t in (query, key, value))
        keys, values = layer.update(key, value)
        attended = functional.scaled_dot_product_attention(query, keys, values, attn_mask=attend, scale=self._scaling)
        attended = attended.transpose(1, 2).reshape(rows, 1, -1).contiguous()
        hidden = block.out(attended) + hidden
        inner = block.fc(_norm(block.ln_2, hidden))
        inner = 0.5 * inner * (1.0 + torch.tanh(_GELU_C * (inner + 0.044715 * torch.pow(inner, 3.0))))
        return block.proj(inner) + hidden


def _norm(norm: nn.LayerNorm, hidden: torch.Tensor) -> torch.Tensor:
    return functional.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def fused_step(model: Any) -> FusedStep | None:
    """The fused step for `model`, or None (with the reason at debug level) where it does not apply."""
    reason = _unsupported(model)
    if reason is not None:
        log.debug("decoding through the model call: %s", reason)
        return None
    blocks = []
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        linears = [_linear(m) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)]
        if any(linear is None for linear in linears):
            log.debug("decoding through the model call: a projection of an unknown kind")
            return None
        qkv, out, fc, proj = (linear for linear in linears if linear is not None)
        blocks.append(_Block(block.ln_1, qkv, out, block.ln_2, fc, proj))
    head = _linear(model.get_output_embeddings())
    return FusedStep(model, blocks, head) if head is not None else None


def _unsupported(model: Any) -> str | None:
    """Why the fused step cannot stand in for `model`'s call (None: it can)."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "GPT2LMHeadModel" or config is None:
        return f"{type(model).__name__} is not GPT-2"
    if model.training or model.device.type != "cpu":
        return "the fused step serves CPU models in eval mode"
    if _instrumented(model):
        return "the model's forward is replaced or hooked, and the fused step would bypass that"
    if config.activation_function != "gelu_new" or config.scale_attn_by_inverse_layer_idx:
        return "an activation or attention scaling the fused step does not implement"
    if not config.scale_attn_weights or config.add_cross_attention or config._attn_implementation != "sdpa":
        return "an attention variant the fused step does not implement"
    expected = {
        "GPT2Block",
        "GPT2Attention",
        "GPT2MLP",
        "LayerNorm",
        "Dropout",
        "NewGELUActivation",
        "LinearPackedParams",
    }
    for block in model.transformer.h:
        for module in block.modules():
            if type(module).__name__ not in expected and not isinstance(module, _KNOWN_PROJECTIONS):
                return f"a module the fused step does not know: {type(module).__name__}"
    return None


def _instrumented(model: nn.Module) -> bool:
    """Whether something watches or changes the model's calls (an instance-level `forward`, forward hooks)."""
    return "forward" in vars(model) or any(
        module._forward_hooks or module._forward_pre_hooks for module in model.modules()
    )


def _linear(module: nn.Module) -> Linear | None:
    """A projection as one call, exactly as the module computes it."""
    if type(module) is Conv1D:
        weight, bias = module.weight, module.bias
        return lambda x: torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(*x.shape[:-1], -1)
    if type(module) is nn.Linear:
        return lambda x: functional.linear(x, module.weight, module.bias)
    if type(module) is PackedLinear:
        return module.forward
    if type(module) is _QuantizedLinear and module._packed_params.dtype == torch.qint8:
        packed = module._packed_params._packed_params
        if module.version is None or module.version < 4:
            return lambda x: torch.ops.quantized.linear_dynamic(x, packed)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True)
    return None


_ADAPTED = "_magpie_adapted"


def mark_adapted(model: nn.Module) -> None:
    """Says that `model`'s projections were wrapped after a fused step may have been built for it (a voice's LoRA
    layers, `core.serving.engine._voices.attach`): such a step would bypass them, so every `DecodingModel` of `model`
    hands its steps back to the model call from then on."""
    object.__setattr__(model, _ADAPTED, True)


class DecodingModel:
    """`model` for `KVBatch`: single-token steps go through the fused step where it applies, the rest (prefill) to
    the model itself. Exposes what `KVBatch` reads (`device`, the call's `.logits`)."""

    def __init__(self, model: Any, step: FusedStep | None) -> None:
        self.model = model
        self.step = step
        self.device = model.device

    @property
    def adapted(self) -> bool:
        return bool(getattr(self.model, _ADAPTED, False))

    def __call__(self, **kwargs: Any) -> Any:
        ids, cache = kwargs["input_ids"], kwargs.get("cache")
        if self.step is None or cache is None or ids.shape[1] != 1 or "logits_to_keep" in kwargs or self.adapted:
            return self.model(**kwargs)
        return StepOutput(self.step(ids, kwargs["position_ids"], kwargs["attention_mask"], cache.layers))


def decoding_model(model: Any) -> Any:
    """`model` wrapped with its fused step, or `model` itself where no fused step applies (or it is already
    wrapped)."""
    if isinstance(model, DecodingModel):
        return model
    step = fused_step(model)
    return DecodingModel(model, step) if step is not None else model
