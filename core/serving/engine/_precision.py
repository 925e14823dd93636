"""Serving precision (SERVE_PRECISION): fp32, bf16, dynamic int8, and `auto`, which picks one behind a loss gate.

Why these choices:
- *int8* is torch's dynamic quantization of the transformer blocks' projections and of the LM head. transformers'
  GPT-2 keeps the projections as `Conv1D` (a transposed linear), which `quantize_dynamic` does not recognise, so
  each block's `Conv1D`s become `nn.Linear`s first. Block by block, so at most one block exists twice while
  converting (peak memory). The LM head gets an int8 copy while the embedding lookup keeps the fp32 table (see
  `_quantize_head` for why). Dynamic quantization runs on the CPU only. It picks one activation scale per tensor,
  i.e. per batch: an int8 row's rounding depends on the rows (and padding) beside it, so int8 answers are not
  batch-invariant the way fp32's are (the same prompt alone and in a batch can differ after a near-tie).
- *bf16* halves the weights' memory traffic, but it only pays where the hardware computes bf16 natively (CUDA,
  CPUs with AVX512-BF16 or AMX); elsewhere torch emulates it, slower than fp32, so it is refused there.
- *auto* tries the candidates fastest first (int8, then bf16; a fixed order: on CPUs int8 reads a quarter of the
  weight bytes fp32 does and bf16 half, and measuring speed at load would need two converted copies at once) and
  keeps the first whose loss on a fixed built-in dialogue sample is within `LOSS_TOLERANCE` of fp32's; else fp32.
  The sample is built in because a version's own eval split is people's messages, which live only in the
  database (the version directory holds their ids, so that /forget and retention reach them): copying them next
  to the weights for this check would keep them beyond both.
- The choice is cached per model version (`CACHE_FILE` in its directory, keyed by the machine: device, the CPU's
  capability as torch sees it and its vector/matrix flags, native bf16, torch) since version directories never
  change, so a restart or a swap back does not pay the check again while another machine decides for itself; base
  models are measured at every load (it is cheap: two forward passes over ~100 tokens). The decision is logged in
  one line, with the losses that made it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from core.hardware import cpu_has_native_bf16
from core.serving.dialogue import Turn, encode_dialogue
from core.serving.engine._types import Precision

log = logging.getLogger(__name__)

Served = Literal["fp32", "bf16", "int8"]
PREFERENCE: tuple[Served, ...] = ("int8", "bf16")  # fastest first; fp32 is the fallback
LOSS_TOLERANCE = 0.02  # a candidate may lose at most 2% relative to fp32's loss on the gate sample
CACHE_FILE = "serving-precision.json"
_GATE_SAMPLE = (
    ("user:1", "hello there, how are you today?"),
    ("bot", "I am fine, thank you. And you?"),
    ("user:1", "not bad. what are you up to this weekend?"),
    ("bot", "reading a book and going for a long walk by the sea."),
    ("user:2", "does anyone know a good recipe for pasta with tomatoes and garlic?"),
    ("bot", "fry the garlic in olive oil, add the tomatoes, simmer for ten minutes and mix with the pasta."),
    ("user:2", "thanks! and how long should the pasta cook?"),
    ("bot", "about nine minutes, then taste it."),
)


def unsupported(precision: Served, device: str, model: PreTrainedModel | None = None) -> str | None:
    """Why `precision` cannot serve `model` on `device` (None: it can)."""
    if precision == "int8" and device != "cpu":
        return "int8 (dynamic quantization) runs on the CPU only"
    if precision == "int8" and model is not None and _blocks(model) is None:
        return f"int8 conversion does not know the layers of {type(model).__name__}"
    if precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
        return "this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is slower than fp32"
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def convert(model: PreTrainedModel, precision: Served) -> PreTrainedModel:
    """`model` in `precision`, converted in place (the returned model is the same object, for chaining)."""
    if precision == "bf16":
        nn.Module.to(model, torch.bfloat16)  # transformers types `to` for devices only
    elif precision == "int8":
        for block in _blocks(model) or []:
            _conv1d_to_linear(block)
            _quantize_linears(block)
        _quantize_head(model)
        _own_remaining_weights(model)
    return model


def _own_remaining_weights(model: PreTrainedModel) -> None:
    """Copies the float tensors int8 leaves (embeddings, layer norms, biases) out of the checkpoint's memory map.

    They are views into the mmap'd safetensors file, which keeps the whole file mapped: its pages, all read during
    the conversion, stay in the process's resident set (about 500 MB for GPT-2 small) although the quantized
    model needs a fifth of them. Owning the ~150 MB that remain lets the mapping go; `malloc_trim` then hands
    the conversion's freed temporaries back to the system (measured by bench/serving_memory.py).
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()
    return_freed_memory()


def return_freed_memory() -> None:
    """Hands the heap's free pages back to the system (`malloc_trim`): a load's temporaries (weights read, copied,
    converted) are freed into glibc's heap, which otherwise keeps them in the resident set."""
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere the allocator keeps its pages
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _quantize_head(model: PreTrainedModel) -> None:
    """An int8 LM head beside the fp32 embedding table it was tied to (the input side keeps the fp32 lookup).

    The head is a third of GPT-2 small's weights and at batch 1 every token reads all of it: measured on GPT-2
    small's shape, blocks only gave 1.66x per token, blocks and head 2.21x, with the same top-1 tokens. The float
    `nn.Linear` handed to the quantizer shares the existing weight, so the only new memory is the int8 copy.
    """
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    if not isinstance(head, nn.Linear):
        return
    shared = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    shared.weight = head.weight
    shared.bias = head.bias
    wrapper = nn.Sequential(shared)
    _quantize_linears(wrapper)
    model.set_output_embeddings(wrapper[0])  # type: ignore[no-untyped-call]


def _quantize_linears(block: nn.Module) -> None:
    """torch marks `torch.ao.quantization` deprecated in favour of torchao (another dependency, with its own
    kernels to measure); torch 2.13 still ships it and its kernels (fbgemm), so it stays until torch drops it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            block, {nn.Linear}, dtype=torch.qint8, inplace=True
        )


def _blocks(model: PreTrainedModel) -> list[nn.Module] | None:
    """The transformer blocks (GPT-2's `h`, most others' `layers`), converted one at a time; None if unknown."""
    base = getattr(model, "base_model", model)
    blocks = getattr(base, "h", None) or getattr(base, "layers", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else None


def _conv1d_to_linear(module: nn.Module) -> None:
    """Replaces every `Conv1D` under `module` by the equivalent `nn.Linear` (Conv1D stores the weight transposed)."""
    for name, child in list(module.named_children()):
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.weight.shape[0], child.nf, device=child.weight.device)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            setattr(module, name, linear)
        else:
            _conv1d_to_linear(child)


def gate_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> float:
    """Mean next-token loss on the built-in dialogue sample, in the dialogue format the model serves."""
    turns = [Turn(speaker, text) for speaker, text in _GATE_SAMPLE]
    ids = encode_dialogue(turns, tokenizer, open_reply=False).ids[: _window(model)]
    batch = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        return float(model(input_ids=batch, labels=batch).loss)


def _window(model: PreTrainedModel) -> int:
    config = model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024)


def apply_precision(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    requested: Precision,
    device: str,
    reload: Callable[[], PreTrainedModel],
    cache_dir: Path | None,
) -> tuple[PreTrainedModel, Served]:
    """The model to serve and its precision. An explicit precision the device cannot run falls back to fp32 with
    a warning; `auto` goes through the loss gate (or its cached verdict in `cache_dir`). `reload` gives a fresh
    fp32 copy when a candidate failed the gate (conversions are in place, to keep one copy in memory)."""
    if requested == "fp32":
        return model, "fp32"
    if requested != "auto":
        if (reason := unsupported(requested, device, model)) is not None:
            log.warning("SERVE_PRECISION=%s is not available, serving fp32: %s.", requested, reason)
            return model, "fp32"
        return convert(model, requested), requested
    cached = cached_verdict(cache_dir, device)
    if cached is not None:
        log.info("SERVE_PRECISION=auto: %s, decided earlier for this version on this machine (%s)", cached, cache_dir)
        return convert(model, cached), cached
    model, chosen, losses = _choose(model, tokenizer, device=device, reload=reload)
    log.info("SERVE_PRECISION=auto picked %s: %s", chosen, _why(chosen, losses))
    _write_cache(cache_dir, device, chosen, losses)
    return model, chosen


def _why(chosen: Served, losses: dict[str, float]) -> str:
    """The one-line reason for `auto`'s choice: the gate losses it compared."""
    reference = losses["fp32"]
    tried = ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items() if name != "fp32") or "nothing to try"
    limit = f"the {LOSS_TOLERANCE:.0%} gate over fp32's {reference:.4f}"
    if chosen == "fp32":
        return f"no faster precision stayed within {limit} (tried: {tried}) on this machine"
    return f"the fastest precision within {limit} on the built-in dialogue (gate loss: {tried}) on this machine"


def _choose(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, device: str, reload: Callable[[], PreTrainedModel]
) -> tuple[PreTrainedModel, Served, dict[str, float]]:
    """The first candidate within the gate, converted; else fp32 (reloaded if a failed candidate changed it)."""
    reference = gate_loss(model, tokenizer)
    losses = {"fp32": reference}
    for candidate in PREFERENCE:
        if (reason := unsupported(candidate, device, model)) is not None:
            log.debug("serving precision %s skipped: %s", candidate, reason)
            continue
        loss = gate_loss(convert(model, candidate), tokenizer)
        losses[candidate] = loss
        if math.isfinite(loss) and loss <= reference * (1 + LOSS_TOLERANCE):
            return model, candidate, losses
        log.debug("serving precision %s rejected: gate loss %.4f vs fp32 %.4f", candidate, loss, reference)
        model = reload()
    return model, "fp32", losses


_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_capability() -> str:
    """The CPU features the precisions' kernels depend on: torch's dispatch level and the vector/matrix flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    present = "+".join(flag for flag in _CPU_FLAGS if flag in flags) or "-"
    return f"{torch.backends.cpu.get_cpu_capability()}:{present}"


def machine_key(device: str) -> str:
    """What the verdict (and the stored int8 weights) depend on besides the weights: where it runs, the CPU's
    capability and torch's kernels. Another machine (or a torch upgrade) decides again."""
    return f"{device}|cpu={cpu_capability()}|native_bf16={cpu_has_native_bf16()}|torch={torch.__version__}"


def cached_verdict(cache_dir: Path | None, device: str) -> Served | None:
    """`auto`'s verdict stored for this version on this machine, if any."""
    if cache_dir is None:
        return None
    try:
        entry = json.loads((cache_dir / CACHE_FILE).read_text())["machines"][machine_key(device)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    precision = entry.get("precision") if isinstance(entry, dict) else None
    return cast("Served", precision) if precision in ("fp32", "bf16", "int8") else None


def _write_cache(cache_dir: Path | None, device: str, chosen: Served, losses: dict[str, float]) -> None:
    """Best effort: a read-only version directory only means measuring again at the next load."""
    if cache_dir is None:
        return
    path = cache_dir / CACHE_FILE
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        machines = data.get("machines") if isinstance(data, dict) else None
        machines = machines if isinstance(machines, dict) else {}
        machines[machine_key(device)] = {"precision": chosen, "gate_losses": losses, "tolerance": LOSS_TOLERANCE}
        path.write_text(json.dumps({"machines": machines}, indent=2))
    except (OSError, ValueError):
        log.warning("could not cache the serving precision in %s; it will be measured again at the next load", path)
