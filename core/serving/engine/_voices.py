"""Voices: LoRA adapters applied per row, so rows of different communities decode in the same batch.

Why our own batched LoRA instead of peft's forward: peft merges one adapter into the weights (one voice per
batch) or, with `adapter_names=`, loops over row groups inside each layer and needs its own module tree on the
model, which SERVE_PRECISION=int8 has replaced by quantized `nn.Linear`s. Here each targeted projection is wrapped
by a `VoicedLayer` that adds `x @ A @ B` (scaling folded into B) to whatever the base layer computes (fp32
`Conv1D`, bf16, or int8 dynamic-quantized `Linear`); the delta is computed in fp32 and added in the layer's dtype.

The rows' adapters are joined into one pair of matrices per layer: the A of every adapter active in the pass side by
side (`in x R`, R the sum of their ranks) and their B stacked (`R x out`). One pass computes `x @ A_all`, zeroes the
columns that belong to other rows' adapters (a 0/1 mask per row) and multiplies by `B_all`: two small matmuls per
layer whatever the number of voices in the batch, where a loop over voices would cost a few kernel launches per
voice per layer. A row without a voice (the base model) has an all-zero mask and gets `y + 0`, exactly the base.
The joined matrices are rebuilt only when the set of voices in the pass changes (kept for the last two sets,
because a prefill of newcomers and the step of the running rows alternate).

`Adapter` is immutable: replacing a voice builds a new one, and rows that started on the old one keep a reference
and finish on it; memory is freed with its last row.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from core.errors import VoiceLoadError
from core.serving.engine._compiled import mark_adapted
from core.serving.engine._types import VoiceRef

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_PACKED_KEPT = 2  # joined matrices kept per layer: the set of a prefill of newcomers and that of the running rows
_serials = itertools.count(1)
_serials_lock = threading.Lock()


def _next_serial() -> int:
    """A process-wide number per adapter load: tells two loads of the same directory apart."""
    with _serials_lock:
        return next(_serials)


@dataclass(frozen=True, eq=False, slots=True)
class Adapter:
    """One loaded LoRA adapter: per target module (its name in the base model), A^T (`in x r`) and scaled B^T
    (`r x out`), in fp32 on the serving device."""

    ref: VoiceRef
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    serial: int = field(default_factory=_next_serial)

    @property
    def nbytes(self) -> int:
        """Memory the adapter's matrices take (what loading it adds, besides short-lived joined copies)."""
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())


def read_adapter(ref: VoiceRef, model: nn.Module) -> Adapter:
    """Reads a peft LoRA adapter saved with `save_pretrained` and checks it against `model`'s layers.

    Raises `VoiceLoadError` naming the problem: a missing or unreadable directory, an adapter kind the engine does
    not apply (only plain LoRA on linear layers: no DoRA, bias, embedding or `modules_to_save` parts), or a layer
    the model lacks or whose shape differs (an adapter trained on another base).
    """
    directory = Path(ref.source)
    config = _read_config(directory)
    scale = _scale(config, directory)
    tensors = _read_weights(directory)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, part = _split_key(key, directory)
        pairs.setdefault(module, {})[part] = tensor
    if not pairs:
        raise VoiceLoadError(f'Adapter "{directory}" holds no LoRA weights.')
    device = next(model.parameters()).device
    factors = {}
    for module, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise VoiceLoadError(f'Adapter "{directory}" lacks lora_A or lora_B for {module}.')
        a, b = parts["A"].float(), parts["B"].float()  # (r, in) and (out, r), as peft stores them
        check_fits(model, module, in_features=a.shape[1], out_features=b.shape[0], source=directory)
        if a.shape[0] != b.shape[1]:
            raise VoiceLoadError(f'Adapter "{directory}" has mismatched ranks for {module}.')
        factors[module] = (a.t().contiguous().to(device), (b.t() * scale).contiguous().to(device))
    return Adapter(ref, factors)


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise VoiceLoadError(
            f'Adapter "{directory}" could not be read ({type(exc).__name__}): it must be a directory saved by '
            "peft's save_pretrained."
        ) from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise VoiceLoadError(f'Adapter "{directory}" is not a LoRA adapter.')
    unsupported = [
        name
        for name in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias")
        if config.get(name)
    ]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise VoiceLoadError(f'Adapter "{directory}" uses {", ".join(unsupported)}, which serving does not apply.')
    return config


def _scale(config: dict[str, Any], directory: Path) -> float:
    """peft's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise VoiceLoadError(f'Adapter "{directory}" has no valid r and lora_alpha.')
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(str(path), device="cpu")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VoiceLoadError(f'Adapter "{path}" could not be read ({type(exc).__name__}).') from None
        if isinstance(loaded, dict):
            return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    raise VoiceLoadError(f'Adapter "{directory}" has no {" or ".join(WEIGHT_FILES)}.')


def _split_key(key: str, directory: Path) -> tuple[str, str]:
    """`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` → (`transformer.h.0.attn.c_attn`, `A`)."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if key.endswith(suffix):
            return key.removeprefix(_PREFIX).removesuffix(suffix), part
    raise VoiceLoadError(f'Adapter "{directory}" holds a tensor serving does not apply: {key}.')


def features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a projection: GPT-2's `Conv1D`, an `nn.Linear` or its int8 dynamic-quantized form."""
    if isinstance(module, VoicedLayer):
        module = module.base
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.nf)
    sizes = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (sizes[0], sizes[1]) if isinstance(sizes[0], int) and isinstance(sizes[1], int) else None


def check_fits(model: nn.Module, name: str, *, in_features: int, out_features: int, source: Path | str) -> None:
    """Raises `VoiceLoadError` unless `model` has a projection `name` of that shape."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise VoiceLoadError(f'Adapter "{source}" targets {name}, which the served model lacks.') from None
    if features(module) != (in_features, out_features):
        raise VoiceLoadError(
            f'Adapter "{source}" does not fit {name} of the served model (trained on another base model?).'
        )


class VoiceRouting:
    """Which adapter each row of the next forward pass speaks with; one per served model, set by the worker thread
    before every pass and read by that model's `VoicedLayer`s."""

    def __init__(self) -> None:
        self.active: tuple[Adapter, ...] = ()
        self.key: tuple[int, ...] = ()  # the active adapters' serials
        self.row_slots = torch.zeros(0, dtype=torch.long)  # per row: its adapter's index in `active`, -1 for none
        self.uniform = False  # every row speaks with the one active adapter: no mask needed
        self.rows_serial = 0  # changes whenever `row_slots` does

    def route(self, adapters: Sequence[Adapter | None], device: torch.device | str) -> None:
        distinct = sorted({a.serial: a for a in adapters if a is not None}.values(), key=lambda a: a.serial)
        slot = {adapter.serial: index for index, adapter in enumerate(distinct)}
        self.active = tuple(distinct)
        self.key = tuple(adapter.serial for adapter in distinct)
        slots = [slot[a.serial] if a is not None else -1 for a in adapters]
        self.row_slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.uniform = len(distinct) == 1 and all(s == 0 for s in slots)
        self.rows_serial += 1


def attach(model: nn.Module, adapter: Adapter, routing: VoiceRouting) -> None:
    """Wraps each projection `adapter` targets in a `VoicedLayer` (once; the worker thread does it between passes).

    Raises `VoiceLoadError` when the model lacks one (a swap brought a base of another shape).
    """
    for name, (a, b) in adapter.factors.items():
        check_fits(model, name, in_features=a.shape[0], out_features=b.shape[1], source=adapter.ref.source)
        module = model.get_submodule(name)
        if isinstance(module, VoicedLayer):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, VoicedLayer(module, name, routing))
        mark_adapted(model)  # a fused step built before this would bypass the new layer


class VoicedLayer(nn.Module):
    """A projection plus the LoRA delta of each row's voice (see the module docstring)."""

    def __init__(self, base: nn.Module, name: str, routing: VoiceRouting) -> None:
        super().__init__()
        self.base = base
        self._name = name
        self._routing = routing
        self._packed: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = (
            OrderedDict()
        )
        self._mask: tuple[int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        routing = self._routing
        if not routing.active:
            return y
        packed = self._joined(routing)
        if packed is None:  # no active voice adapts this layer
            return y
        a, b, owners = packed
        hidden = x.to(a.dtype) @ a
        if not routing.uniform:
            hidden = hidden * self._row_mask(routing, owners)
        return y + (hidden @ b).to(y.dtype)

    def _joined(self, routing: VoiceRouting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A_all, B_all and each column's adapter slot for the active set, built once per set."""
        key = routing.key
        if key in self._packed:
            self._packed.move_to_end(key)
            return self._packed[key]
        parts = [
            (slot, adapter.factors[self._name])
            for slot, adapter in enumerate(routing.active)
            if self._name in adapter.factors
        ]
        joined = None
        if parts:
            a = torch.cat([ab[0] for _, ab in parts], dim=1)
            b = torch.cat([ab[1] for _, ab in parts], dim=0)
            owners = torch.cat([torch.full((ab[0].shape[1],), slot, device=a.device) for slot, ab in parts])
            joined = (a, b, owners)
        self._packed[key] = joined
        while len(self._packed) > _PACKED_KEPT:
            self._packed.popitem(last=False)
        return joined

    def _row_mask(self, routing: VoiceRouting, owners: torch.Tensor) -> torch.Tensor:
        """(rows, 1, R): 1 where a column belongs to the row's own adapter; rebuilt when the rows change."""
        if self._mask is None or self._mask[0] != routing.rows_serial:
            mask = (routing.row_slots[:, None] == owners[None, :]).to(torch.float32)[:, None, :]
            self._mask = (routing.rows_serial, mask)
        return self._mask[1]
