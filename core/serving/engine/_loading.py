"""Loading a model for serving, with one-line errors that name the problem and the fix."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.errors import HubUnreachableError, ModelLoadError
from core.serving.engine._converted import load_converted, save_converted
from core.serving.engine._packed import load_packed
from core.serving.engine._precision import Served, apply_precision, cached_verdict
from core.serving.engine._types import ModelRef, Precision

log = logging.getLogger(__name__)

FALLBACK_CONTEXT_WINDOW = 1024
HUB_PROBE_TIMEOUT_S = 3.0
_HUB_UNREACHABLE_FIX = (
    "Set BASE_MODEL to a local directory, or run `magpie bootstrap` to build an offline starter model."
)


def hub_reachable() -> bool:
    """A quick TCP probe of the Hub (or HF_ENDPOINT's mirror).

    Without it, an offline machine spends about a minute in huggingface_hub's retries before failing; with it,
    an unreachable Hub means cached files only (`local_files_only`), which fails at once when nothing is cached.
    """
    if hf_constants.HF_HUB_OFFLINE:
        return False
    url = urlsplit(hf_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def load_pretrained(source: str, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer, ready for batched generation (left padding, pad = EOS, eval mode).

    Every failure becomes a `ModelLoadError` with one line that names the problem and the fix: operators see it
    at start-up, so it must not be a traceback wall.
    """
    offline = not Path(source).expanduser().exists() and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source, device_map=device, local_files_only=offline)
        model.eval()  # type: ignore[no-untyped-call]
    except Exception as exc:
        log.debug("loading %r failed", source, exc_info=True)
        message = _load_failure(source, exc)
        if message.endswith(_HUB_UNREACHABLE_FIX):
            raise HubUnreachableError(message) from None
        raise ModelLoadError(message) from None
    return model, _for_serving(tokenizer, source)


def _for_serving(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    """Left padding with pad = EOS, which batched decoding needs; a tokenizer without EOS cannot serve."""
    if tokenizer.eos_token is None:
        raise ModelLoadError(f'Model "{source}" has no end-of-text token, which the dialogue format needs.')
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_failure(source: str, exc: Exception) -> str:
    """One line saying why `source` did not load and what to do about it."""
    causes = list(_exception_chain(exc))
    detail = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    if Path(source).expanduser().exists():
        return (
            f'Model "{source}" could not be loaded from that directory ({detail}). '
            "It must hold a model and tokenizer saved with save_pretrained."
        )
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        return (
            f'Model directory "{source}" does not exist. Point BASE_MODEL (or the model version) at a directory '
            "saved with save_pretrained, or run `magpie bootstrap` to build an offline starter model."
        )
    if any(isinstance(cause, LocalEntryNotFoundError | OfflineModeIsEnabled | ConnectionError) for cause in causes):
        return (
            f'Model "{source}" could not be loaded: the Hugging Face Hub is unreachable and it is not cached. '
            + _HUB_UNREACHABLE_FIX
        )
    if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        return f'Model "{source}" was not found on the Hugging Face Hub (or is private): check BASE_MODEL.'
    if any(isinstance(cause, HFValidationError) for cause in causes):
        return f'Model "{source}" is neither an existing directory nor a valid Hugging Face hub id: check BASE_MODEL.'
    return f'Model "{source}" could not be loaded ({detail}).'


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model with what decoding needs to know about it, computed once per load."""

    ref: ModelRef
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    context_window: int
    colon_ids: frozenset[int]  # tokens containing ":", the only ones that can complete a speaker label
    blank_ids: tuple[int, ...]  # whitespace-only tokens, suppressed at the first step so replies start with text
    precision: Served = "fp32"  # what SERVE_PRECISION resolved to for this model on this machine


def _load_in_precision(
    ref: ModelRef, device: str, precision: Precision, version_dir: Path | None, *, packed: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Served]:
    """The model in its serving precision. A version that already served in int8 on this machine loads its stored
    int8 weights directly (no float checkpoint in memory, so no conversion peak); one converted now keeps them.
    fp32 on the CPU is built with its projections packed for oneDNN (`_packed`), or loaded plain where it cannot."""
    if version_dir is not None and (found := _stored(version_dir, device, precision)) is not None:
        return found[0], _local_tokenizer(version_dir, ref.source), found[1]
    if packed and _fp32_known(precision, version_dir, device) and (built := _packed_fp32(ref, device)) is not None:
        return built, _local_tokenizer(Path(ref.source), ref.source), "fp32"
    model, tokenizer = load_pretrained(ref.source, device)
    model, served = apply_precision(
        model,
        tokenizer,
        requested=precision,
        device=device,
        reload=lambda: load_pretrained(ref.source, device)[0],
        cache_dir=version_dir,
    )
    if served != "fp32" and version_dir is not None:
        save_converted(model, version_dir, device, served)
    if packed and served == "fp32" and precision == "auto" and (built := _packed_fp32(ref, device)) is not None:
        return built, tokenizer, "fp32"  # auto has just chosen fp32: the plain model is dropped
    return model, tokenizer, served


def _fp32_known(precision: Precision, version_dir: Path | None, device: str) -> bool:
    """Whether fp32 serves without a gate to pass first (asked for, or `auto`'s cached verdict)."""
    if precision == "auto" and version_dir is not None:
        return cached_verdict(version_dir, device) == "fp32"
    return precision == "fp32"


def _packed_fp32(ref: ModelRef, device: str) -> PreTrainedModel | None:
    source = Path(ref.source)
    return load_packed(source) if device == "cpu" and source.is_dir() else None


def _local_tokenizer(directory: Path, source: str) -> PreTrainedTokenizerBase:
    return _for_serving(AutoTokenizer.from_pretrained(directory, local_files_only=True), source)


def _stored(version_dir: Path, device: str, precision: Precision) -> tuple[PreTrainedModel, Served] | None:
    """The version's stored converted model when int8 or bf16 is what serves it here (asked for, or `auto`'s
    cached verdict)."""
    served = cached_verdict(version_dir, device) if precision == "auto" else precision
    if served not in ("int8", "bf16"):
        return None
    model = load_converted(version_dir, device, served)
    if model is None:
        return None
    if precision == "auto":
        log.info("SERVE_PRECISION=auto: %s, decided earlier for this version on this machine (%s)", served, version_dir)
    return model, served


def prepare(ref: ModelRef, device: str, precision: Precision = "fp32", *, packed: bool = True) -> LoadedModel:
    """`load_pretrained` in the serving `precision` plus the per-model facts decoding needs; raises `ModelLoadError`.
    `packed=False` serves fp32 with its projections as transformers loads them (SERVE_FP32_PACKED).

    Start and swap both come through here, so a newly promoted version passes the same precision gate before it
    serves. A version's directory caches the gate's verdict (versions never change; base models are re-measured).
    """
    version_dir = Path(ref.source) if ref.version_id is not None and Path(ref.source).is_dir() else None
    model, tokenizer, served = _load_in_precision(ref, device, precision, version_dir, packed=packed)
    window = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if not window:
        log.warning("%s does not say its context window; assuming %d tokens", ref.source, FALLBACK_CONTEXT_WINDOW)
    vocab = tokenizer.get_vocab()
    ids = sorted(vocab.values())
    texts = tokenizer.batch_decode([[token_id] for token_id in ids])
    return LoadedModel(
        ref=ref,
        model=model,
        tokenizer=tokenizer,
        context_window=int(window or FALLBACK_CONTEXT_WINDOW),
        colon_ids=frozenset(token_id for token, token_id in vocab.items() if ":" in token),
        blank_ids=tuple(token_id for token_id, text in zip(ids, texts, strict=True) if not text.strip()),
        precision=served,
    )
