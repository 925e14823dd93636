"""int8 (and bf16) weights kept with a model version, so serving loads them directly instead of converting at
every start.

Why: converting to int8 needs the float checkpoint in memory first (about 500 MB for GPT-2 small, mapped and read
whole) and then the int8 copy beside it, so a process that converts peaks well above what it serves with. A
version directory never changes, so the conversion is done once (at its first int8 load) and the quantized
state dict is saved next to the weights (`CONVERTED_FILE`, keyed like the precision verdict by the machine: the
packed int8 layout belongs to torch's kernels on this CPU). Later loads build the model's skeleton on the meta
device (no float weights are ever allocated), put int8 modules where the conversion would, and assign the stored
tensors into it: the float checkpoint is never read.

bf16 is kept the same way (`serving-bf16.pt`): converting it also reads the whole float checkpoint first, so its
load peaked at 1.5x what it serves with (bench/serving_memory.py).

The file is read with `torch.load(weights_only=True)`: it holds tensors (quantized ones included) and plain
values only, so a tampered file cannot run code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from core.serving.engine._precision import _blocks, machine_key

log = logging.getLogger(__name__)

CONVERTED_FILE = "serving-int8.pt"
CONVERTED_FILES = {"int8": CONVERTED_FILE, "bf16": "serving-bf16.pt"}
_QuantizedLinear = torch.ao.nn.quantized.dynamic.Linear


def save_converted(model: PreTrainedModel, directory: Path, device: str, precision: str = "int8") -> None:
    """Stores `model`'s int8 state dict in `directory` for this machine (best effort: a read-only version directory
    only means converting again at the next load). Written to a temporary name first, so a crash leaves no half
    file that a later load would trust."""
    path = directory / CONVERTED_FILES[precision]
    temporary = path.with_suffix(".tmp")
    try:
        torch.save({"machine": machine_key(device), "state": model.state_dict()}, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError):
        log.warning("could not keep the %s weights in %s; the next load converts again", precision, directory)
        with contextlib.suppress(OSError):
            temporary.unlink()


def load_converted(directory: Path, device: str, precision: str = "int8") -> PreTrainedModel | None:
    """The version's stored int8 (or bf16) model, built without its float weights; None when there is none for this
    machine or it does not fit the version's config (then the caller converts as usual)."""
    path = directory / CONVERTED_FILES[precision]
    if device != "cpu" or not path.is_file():
        return None
    try:
        with _quiet():
            stored: dict[str, Any] = torch.load(path, weights_only=True)
        if stored.get("machine") != machine_key(device):
            log.info("the stored %s weights in %s were made on another machine; converting again", precision, directory)
            return None
        model = _int8_skeleton(directory) if precision == "int8" else _bf16_skeleton(directory)
        model.load_state_dict(stored["state"], strict=True, assign=True)
    except Exception:  # a stale or foreign file must not stop serving: converting again is always possible
        log.warning("the stored int8 weights in %s could not be used; converting again", directory, exc_info=True)
        return None
    if any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()]):
        log.warning("the stored int8 weights in %s leave parts of the model empty; converting again", directory)
        return None
    return model


def _int8_skeleton(directory: Path) -> PreTrainedModel:
    """The model's modules as `convert(model, "int8")` leaves them, with no float weights allocated: float
    parameters stay on the meta device until the stored tensors are assigned; int8 modules hold placeholders."""
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    for block in _blocks(model) or []:
        _int8_placeholders(block)
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(_placeholder(head.in_features, head.out_features, head.bias is not None))  # type: ignore[no-untyped-call]
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _bf16_skeleton(directory: Path) -> PreTrainedModel:
    """The model's modules in bf16 on the meta device (no memory) for the stored tensors to be assigned into."""
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    nn.Module.to(model, torch.bfloat16)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _int8_placeholders(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, Conv1D):
            setattr(module, name, _placeholder(child.weight.shape[0], child.nf, True))
        elif isinstance(child, nn.Linear):
            setattr(module, name, _placeholder(child.in_features, child.out_features, child.bias is not None))
        else:
            _int8_placeholders(child)


def _placeholder(in_features: int, out_features: int, bias: bool) -> nn.Module:
    """An int8 linear whose weights the stored state replaces (created on the CPU: quantized modules have no meta
    form; its zero int8 weight is a quarter of the float one and is freed when the stored one is assigned)."""
    with torch.device("cpu"), _quiet():
        return _QuantizedLinear(in_features, out_features, bias_=bias, dtype=torch.qint8)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch warns that quantized tensors are deprecated (in favour of torchao) and that loading them goes through
    TypedStorage; `_precision` keeps torch.ao's kernels until torch drops them (see `_quantize_linears`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)
        yield
