"""Peak memory of a serving process, per precision: after the model is loaded and converted, and after serving.

    python bench/serving_memory.py [--precisions fp32,int8,bf16,auto] [--chats 16] [--shape gpt2|tiny]

Each precision runs in a fresh child process (so one's peak does not hide another's, and allocator caches from the
benchmark's own model building do not count): it starts `core.serving.engine.Engine` on a GPT-2-small-shaped model
(random weights, saved with `save_pretrained`), reads the process's peak RSS (`ru_maxrss`) once the model serves
(the conversion peak: int8 converts block by block), then serves `--chats` concurrent chats of 32 tokens and reads
it again (the serving peak, KV cache included) with the resident set at that moment. Issue #12's targets: both
<= 1.3 GB for GPT-2 small. Figures are MiB (ru_maxrss / 1024).

The model is served as a version (a `ModelRef` with a version id), as a promoted model is: a first child process
loads it once in int8, bf16 and `auto` (the "promotion": it converts, keeps `serving-int8.pt`, `serving-bf16.pt`
where bf16 serves, and the verdict in the version directory), so every measured process loads the stored weights
directly, as every start after the first does. Issue #22's target: the loading peak <= the serving RSS + 10% (the
`load/serve` column <= 1.10).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from generation import build_in_child, chats, cpu_description  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from core.serving.engine import Engine, EngineConfig, GenerationParams, ModelRef  # noqa: E402
from core.settings import Settings  # noqa: E402

Result = tuple[str, float, float, float]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    """The resident set now (Linux), after the conversion's temporary copies were freed."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def serve(directory: Path, precision: str, count: int) -> Result:
    settings = Settings(_env_file=None, device="cpu")  # type: ignore[call-arg]
    params = GenerationParams.from_settings(settings, max_new_tokens=32, min_new_tokens=32)
    config = EngineConfig.from_settings(
        settings, precision=precision, params=params, max_batch_size=count, queue_size=count, timeout_s=3600.0
    )
    engine = Engine(config)
    await engine.start(ModelRef(str(directory), "gpt2-shape", 1))
    loaded = peak_mb()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))  # the tokenizer alone: no second model in memory
    await asyncio.gather(*(engine.generate_response(turns) for turns in chats(count, tokenizer)))
    served = engine.precision or "?"
    now = current_mb()
    await engine.close()
    return served, loaded, peak_mb(), now


def promote(directory: Path) -> None:
    """What the first load of a promoted version does once: convert to int8 and keep it, decide `auto`."""
    from core.serving.engine._loading import prepare  # in the child only

    for precision in ("int8", "bf16", "auto"):  # bf16 only where this machine serves it
        prepare(ModelRef(str(directory), "gpt2-shape", 1), "cpu", precision)  # type: ignore[arg-type]


def child(directory: Path, precision: str, count: int, results: multiprocessing.Queue[Result]) -> None:
    results.put(asyncio.run(serve(directory, precision, count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="fp32,int8,bf16,auto")
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--shape", choices=("gpt2", "tiny"), default="gpt2")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(cpu_description())
    print(
        f"{'precision':10} {'served':7} {'peak RSS, loaded':>17} {'peak RSS, served':>17} {'RSS after':>10}"
        f" {'load/serve':>10} (MiB)"
    )
    with tempfile.TemporaryDirectory(prefix="magpie-memory-") as name:
        directory = Path(name)
        build_in_child(directory, args.shape)
        promotion = context.Process(target=promote, args=(directory,))
        promotion.start()
        promotion.join()
        for precision in args.precisions.split(","):
            results: multiprocessing.Queue[Result] = context.Queue()
            process = context.Process(target=child, args=(directory, precision, args.chats, results))
            process.start()
            served, loaded, after, now = results.get()
            process.join()
            print(f"{precision:10} {served:7} {loaded:>17.0f} {after:>17.0f} {now:>10.0f} {loaded / now:>10.2f}")


if __name__ == "__main__":
    main()
