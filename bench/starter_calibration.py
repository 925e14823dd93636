"""Where issue #3's starter calibration (held-out perplexity ~21) comes from, measured side by side.

The issue's recipe, followed literally: every chatterbot-corpus conversation (English + Korean) as one text in the
shared dialogue format, an 8k byte-level BPE trained on all of it, a random 10% of the conversations held out,
run_clm packing (256-token blocks) for training and evaluation, a 4-layer x 256 GPT-2, AdamW 1e-3, batch 8,
10 epochs, perplexity = exp(Trainer eval loss) per epoch.

- `as-shipped`: the corpus as it ships. Many conversations repeat verbatim (tech_support.yml repeats ten
  exchanges ~100 times), so half of the held-out conversations are also training conversations.
- `deduplicated`: the same recipe after dropping exact repeats: every held-out conversation is one the model
  never saw, which is what the issue asks to measure.

    python bench/starter_calibration.py [--variants as-shipped,deduplicated] [--epochs 10] [--threads 2]

Each variant takes ~5 minutes on a 2-core machine. `magpie bootstrap` itself trains on the deduplicated corpus
with a different (per-sample) evaluation; its own figure is in the starter's metrics.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainingArguments, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.perplexity import perplexity_text
from core.serving.dialogue import GPT2_EOS, Turn, clean_text, format_dialogue
from trainer.corpus import Dialogue, load_dialogues
from trainer.starter_model import ModelShape, build_model, train_tokenizer

BLOCK = 256


def conversation_text(dialogue: Dialogue) -> str:
    turns = [Turn("ab"[index % 2], clean_text(line, eos=GPT2_EOS)) for index, line in enumerate(dialogue.lines)]
    return format_dialogue(turns, responder="b", eos=GPT2_EOS, open_reply=False)


def split(texts: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = set(order[: len(texts) // 10])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def packed(texts: list[str], tokenizer: Any) -> tuple[list[dict[str, list[int]]], int]:
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    usable = len(ids) // BLOCK * BLOCK
    return [{"input_ids": ids[i : i + BLOCK], "labels": ids[i : i + BLOCK]} for i in range(0, usable, BLOCK)], len(ids)


def run(variant: str, epochs: int) -> None:
    texts = [conversation_text(d) for d in load_dialogues(("english", "korean"))]
    if variant == "deduplicated":
        texts = list(dict.fromkeys(texts))
    train_texts, eval_texts = split(texts)
    seen = set(train_texts)
    tokenizer = train_tokenizer([turn for text in texts for turn in text.split(GPT2_EOS) if turn], vocab_size=8000)
    train_blocks, train_tokens = packed(train_texts, tokenizer)
    eval_blocks, eval_tokens = packed(eval_texts, tokenizer)
    leaked = sum(text in seen for text in eval_texts)
    print(
        f"[{variant}] {len(texts)} conversations, {train_tokens + eval_tokens} tokens; held out {len(eval_texts)} "
        f"conversations ({eval_tokens} tokens), {leaked} of them also in training",
        flush=True,
    )
    args = TrainingArguments(
        output_dir="/tmp/magpie-starter-calibration",
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    model = build_model(tokenizer, ModelShape(), seed=0)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=default_data_collator,
    )
    started = time.perf_counter()
    trainer.train()
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    per_epoch = ", ".join(perplexity_text(loss) for loss in losses)
    print(f"[{variant}] held-out perplexity per epoch: {per_epoch}", flush=True)
    print(
        f"[{variant}] best {perplexity_text(min(losses))} after {time.perf_counter() - started:.0f} s of training",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="as-shipped,deduplicated")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    transformers.logging.set_verbosity_error()
    for variant in options.variants.split(","):
        if variant not in ("as-shipped", "deduplicated"):
            parser.error(f"unknown variant {variant!r}")
        run(variant, options.epochs)


if __name__ == "__main__":
    main()
