"""ChatterBot's side of `bench/learning.py`, run in ChatterBot's own environment (its pins conflict with Magpie's).

Reads `{"logs": [[line, ...] per group], "kept": [...], "prompts": {name: [text, ...]}}` on stdin, trains a fresh
ChatterBot on the logs (ListTrainer: each line is learned as the response to the one before it), answers every
prompt, then does the same with `kept` (the logs without the forgotten teachers' lines) and answers the taught
prompts again as `after_forget`. Prints the answers and the training times as JSON. The spaCy English model is not
installable offline, so the tagger is ChatterBot's LowercaseTagger (spaCy's blank pipeline).
"""

from __future__ import annotations

import json
import sys
import time

from chatterbot import ChatBot
from chatterbot.tagging import LowercaseTagger
from chatterbot.trainers import ListTrainer


def trained(logs: list[list[str]]) -> tuple[ChatBot, float]:
    bot = ChatBot(
        "peer", storage_adapter="chatterbot.storage.SQLStorageAdapter", database_uri="sqlite://", read_only=True,
        tagger=LowercaseTagger,
    )  # fmt: skip
    trainer = ListTrainer(bot, show_training_progress=False)
    started = time.perf_counter()
    for log in logs:
        trainer.train(log)
    return bot, time.perf_counter() - started


def main() -> None:
    request = json.load(sys.stdin)
    bot, first = trained(request["logs"])
    answers = {name: [str(bot.get_response(text)) for text in texts] for name, texts in request["prompts"].items()}
    bot, second = trained(request["kept"])
    answers["after_forget"] = [str(bot.get_response(text)) for text in request["prompts"]["taught"]]
    answers["train_s"] = [first, second]
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
