"""One decoding step, the fused step (core/serving/engine/_compiled.py) against the model call it replaces, at several
batch sizes and precisions, side by side in one run.

    python bench/decode_step.py [--precisions int8,fp32] [--batches 1,4,16] [--threads 1] [--shape gpt2|tiny]

Each measurement: a KV batch of `batch` rows prefilled with a 30-token prompt, two warm-up steps, then the mean of
8 steps; the two ways alternate three times and the best of each is kept (the machine is shared, the minimum is
the steadiest figure). The logits of both ways are bitwise equal (tests/test_fused_step.py). In fp32 a third way,
the fused step on the weights in their plain layout (as transformers loads them, before `_packed`), shows what
packing them for oneDNN buys.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from generation import build_in_child, cpu_description  # noqa: E402

from core.serving.engine import ModelRef, load_pretrained  # noqa: E402
from core.serving.engine._batching import KVBatch  # noqa: E402
from core.serving.engine._loading import prepare  # noqa: E402


def step_ms(model: torch.nn.Module, batch: int, *, fused: bool) -> float:
    kv = KVBatch(model)
    if not fused:
        kv._model = model  # the model call, as before the fused step
    kv.prefill([list(range(5, 35))] * batch)
    tokens = [7] * batch
    for _ in range(2):
        kv.step(tokens)
    started = time.perf_counter()
    for _ in range(8):
        kv.step(tokens)
    return (time.perf_counter() - started) / 8 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="int8,fp32")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", choices=("gpt2", "tiny"), default="gpt2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_description()}\n{args.threads} torch thread(s)")
    with tempfile.TemporaryDirectory(prefix="magpie-step-") as name, torch.inference_mode():
        build_in_child(Path(name), args.shape)
        for precision in args.precisions.split(","):
            model = prepare(ModelRef(name, "gpt2-shape"), "cpu", precision).model  # type: ignore[arg-type]
            # fp32 serves its projections packed for oneDNN (core/serving/engine/_packed.py); the plain layout is
            # the model as transformers loads it
            unpacked = load_pretrained(name, "cpu")[0] if precision == "fp32" else None
            for batch in (int(b) for b in args.batches.split(",")):
                plain, fused, layout = float("inf"), float("inf"), float("inf")
                for _ in range(3):  # alternating, so a change in the machine's load hits every way alike
                    plain = min(plain, step_ms(model, batch, fused=False))
                    fused = min(fused, step_ms(model, batch, fused=True))
                    if unpacked is not None:
                        layout = min(layout, step_ms(unpacked, batch, fused=True))
                packing = f", fused on plain weights {layout:7.1f} ms/step ({layout / fused:4.2f}x)" if unpacked else ""
                print(
                    f"{precision:5} batch {batch:3}: model call {plain:7.1f} ms/step, fused {fused:7.1f} ms/step,"
                    f" {plain / fused:5.2f}x{packing}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
