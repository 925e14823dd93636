"""Does the bot say back what its community taught? Measured the way a user would find out.

A community is generated here (nothing from a hub): many people in three Telegram groups, ten questions with odd
answers, each pair asked and answered by about a dozen different people several times, as platform replies and as
plain follow-ups, among everyday chatter. Every line goes through the real chat service into a real SQLite log;
the real training run (`trainer.retrain.retrain`, what `python -m trainer.retrain` runs) builds the dataset, trains
and promotes; then each question is asked through the chat service and the real engine:

- as taught, in a fresh private chat;  - paraphrased (wordings never taught), in a fresh private chat;
- in a fresh group, addressed to the bot after three lines of other chatter;
- ten unrelated questions: how many get one of the taught answers;
- every reply that repeats a question (the one asked or any taught one) counts as an echo;
- then every teacher of one pair sends `/forget`, the admin rolls back the version that learned from them (as the
  `/forget` reply suggests) and retrains: that pair should be gone, the nine others kept.

Rows: the offline starter (built once and cached under models/, `--starter DIR` to reuse one), a tiny random GPT-2
(2 layers), and ChatterBot 1.2.15 on the same logged conversations (in its own virtual environment: its pins
conflict with Magpie's SQLAlchemy; `--chatterbot-python`). The end prints the CPU, its flags, the load average,
each run's training time, and item 7 of issue #19: how long a /retrain of 1k, 10k and 100k logged messages takes
at GPT-2 small's shape with the current recipe, extrapolated from a few measured steps.

    python bench/learning.py [--quick] [--rows starter,tiny,chatterbot] [--starter DIR] [--epochs N]
                             [--learning-rate LR] [--min-steps N] [--no-forget]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.generation import cpu_description
from core.chat.messages import ChatKind, IncomingMessage
from core.chat.service import ChatService
from core.serving.engine import Engine
from core.serving.engine._types import ModelRef
from core.settings import Settings
from core.storage.db import Database, upgrade
from core.storage.models import VersionStatus
from core.storage.versions import get_active_version, set_version_status
from trainer import runs
from trainer.bootstrap import STARTER_FINE_TUNE_MIN_STEPS, STARTER_FINE_TUNE_RATE
from trainer.filters import normalise
from trainer.retrain import retrain

ROOT = Path(__file__).resolve().parent.parent

PAIRS: list[tuple[str, str, str]] = [
    ("what is the password?", "purple elephant dance", "tell me the password"),
    ("how is the weather?", "raining frogs again", "how's the weather today?"),
    ("who is the captain?", "captain biscuit", "who's our captain?"),
    ("what do we eat tonight?", "cold pancakes forever", "what are we eating tonight?"),
    ("where is the meeting?", "under the blue bridge", "where's the meeting again?"),
    ("what is the magic number?", "seventeen and a half", "what's the magic number?"),
    ("who won the game?", "the angry ducks", "who won the game yesterday?"),
    ("what is the secret word?", "banana telescope", "what's the secret word?"),
    ("when is the party?", "never on tuesdays", "when's the party?"),
    ("what is our motto?", "socks before shoes", "remind me of our motto"),
]
"""(question, odd answer, a paraphrase never taught)."""

UNRELATED = [
    "do you like music?", "what time is it?", "can you help me with my homework?", "where do you live?",
    "what is your favourite colour?", "have you seen my keys?", "is it a holiday today?", "how old are you?",
    "what should i read next?", "do you play chess?",
]  # fmt: skip
CHATTER = [
    "anyone up for a walk later?", "i just got back from the shop", "that film last night was great",
    "my cat knocked over the plant again", "good morning everyone", "lol that is so true", "who made coffee?",
    "i need a holiday", "this week is so long", "did you see the news?", "brb", "nice one", "see you all tomorrow",
    "the bus was late again", "haha yes", "i am learning to cook", "happy friday!", "ok sounds good",
]  # fmt: skip


@dataclass
class Scale:
    teachers: int
    """Different people who answer each pair (and as many who ask it)."""
    repeats: int
    """Times each asker-teacher exchange happens."""
    people: int


FULL, QUICK = Scale(teachers=12, repeats=2, people=60), Scale(teachers=6, repeats=2, people=30)


@dataclass
class Said:
    group: int
    author: int
    text: str
    replies_to: int | None = None
    """The index in its group's log of the message it replies to on the platform."""


def community(scale: Scale, seed: int) -> tuple[list[list[Said]], dict[int, set[int]]]:
    """Three groups' logs and, per pair, the people who taught its answer (for /forget)."""
    rng = random.Random(seed)
    people = list(range(1, scale.people + 1))
    teachers: dict[int, set[int]] = {}
    exchanges = []
    for index in range(len(PAIRS)):
        answerers = rng.sample(people, scale.teachers)
        askers = rng.sample([p for p in people if p not in answerers], scale.teachers)
        teachers[index] = set(answerers)
        exchanges += [(index, a, t) for a, t in zip(askers, answerers, strict=True) for _ in range(scale.repeats)]
    rng.shuffle(exchanges)
    groups: list[list[Said]] = [[], [], []]
    for number, (index, asker, teacher) in enumerate(exchanges):
        log = groups[number % 3]
        group = number % 3
        for _ in range(rng.randint(0, 2)):
            log.append(Said(group, rng.choice(people), rng.choice(CHATTER)))
        question = len(log)
        log.append(Said(group, asker, PAIRS[index][0]))
        as_reply = rng.random() < 0.5
        if as_reply and rng.random() < 0.5:  # someone else speaks in between: the platform reply says what it answers
            log.append(Said(group, rng.choice(people), rng.choice(CHATTER)))
        log.append(Said(group, teacher, PAIRS[index][1], replies_to=question if as_reply else None))
    return groups, teachers


def incoming(said: Said, index: int, at: datetime) -> IncomingMessage:
    """The line as an adapter hands it over (on a checkout from before reply structure, without its reply)."""
    extra: dict[str, Any] = {}
    if said.replies_to is not None and "reply_to_message_id" in IncomingMessage.__dataclass_fields__:
        extra["reply_to_message_id"] = str(said.replies_to)
    return IncomingMessage(
        platform="telegram", chat_id=f"-100{said.group}", chat_kind=ChatKind.GROUP, author_id=str(said.author),
        author_name=f"person {said.author}", text=said.text, message_id=str(index), sent_at=at, **extra,
    )  # fmt: skip


async def log_community(service: ChatService, groups: Sequence[Sequence[Said]]) -> int:
    """Every line through the chat service, as a platform adapter hands it over; a two-hour silence every 40 lines
    (and so many conversations, some held out by the dataset)."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    count = 0
    for log in groups:
        at = start
        for index, said in enumerate(log):
            at += timedelta(hours=2) if index and index % 40 == 0 else timedelta(seconds=30)
            await service.handle(incoming(said, index, at))
            count += 1
    return count


@dataclass
class Scores:
    taught: int = 0
    paraphrased: int = 0
    in_group: int = 0
    unrelated_taught: int = 0
    echoes: int = 0
    asked: int = 0
    forgotten_recalled: int = 0
    others_after_forget: int = 0
    echoes_after_forget: int = 0
    train_s: list[float] = field(default_factory=list)
    logged: int = 0
    examples: list[str] = field(default_factory=list)


class Asker:
    """Asks through the chat service: each question in a chat nobody used before."""

    def __init__(self, service: ChatService) -> None:
        self.service, self.chats = service, 0

    async def private(self, text: str) -> str:
        self.chats += 1
        chat = f"asker-{self.chats}"
        message = IncomingMessage("telegram", chat, ChatKind.PRIVATE, chat, "asker", text, "1")
        reply = await self.service.handle(message)
        return reply.text if reply else ""

    async def in_group(self, text: str) -> str:
        self.chats += 1
        chat = f"-200{self.chats}"
        for index, line in enumerate(CHATTER[self.chats % 5 : self.chats % 5 + 3]):
            await self.service.handle(
                IncomingMessage("telegram", chat, ChatKind.GROUP, f"g{index}", "x", line, f"{index}")
            )
        message = IncomingMessage("telegram", chat, ChatKind.GROUP, "asker", "asker", text, "9", addressed=True)
        reply = await self.service.handle(message)
        return reply.text if reply else ""


def same(reply: str, expected: str) -> bool:
    return normalise(reply) == normalise(expected)


def is_echo(reply: str, asked: str) -> bool:
    return any(same(reply, question) for question in (asked, *(q for q, _, _ in PAIRS)))


async def probe(service: ChatService, scores: Scores, *, forgotten: int | None) -> None:
    """Asks every question; before the /forget all measures, after it the forgotten pair and the others."""
    asker = Asker(service)
    for index, (question, answer, paraphrase) in enumerate(PAIRS):
        reply = await asker.private(question)
        scores.asked += 1
        if forgotten is None:
            scores.taught += same(reply, answer)
            scores.echoes += is_echo(reply, question)
            paraphrased = await asker.private(paraphrase)
            scores.paraphrased += same(paraphrased, answer)
            scores.echoes += is_echo(paraphrased, paraphrase)
            grouped = await asker.in_group(question)
            scores.in_group += same(grouped, answer)
            scores.echoes += is_echo(grouped, question)
            scores.examples.append(
                f"{question!r} -> {reply!r} | {paraphrase!r} -> {paraphrased!r} | in a group -> {grouped!r}"
            )
        elif index == forgotten:
            scores.forgotten_recalled += same(reply, answer)
        else:
            scores.others_after_forget += same(reply, answer)
            scores.echoes_after_forget += is_echo(reply, question)
    if forgotten is None:
        answers = [a for _, a, _ in PAIRS]
        for question in UNRELATED:
            reply = await asker.private(question)
            scores.unrelated_taught += any(same(reply, a) for a in answers)
            scores.echoes += is_echo(reply, question)
            scores.examples.append(f"unrelated {question!r} -> {reply!r}")


def bench_settings(directory: Path, base_model: str, args: argparse.Namespace, *, scratch: bool) -> Settings:
    """The TRAIN_* settings' recipe (unset: the starter's own, from its config); the tiny row, a random model that
    names none, gets the starter's (`trainer.bootstrap`)."""
    overrides: dict[str, Any] = {"train_epochs": args.epochs} if args.epochs else {}
    if args.learning_rate or scratch:
        overrides["train_learning_rate"] = args.learning_rate or STARTER_FINE_TUNE_RATE
    if scratch or args.min_steps is not None:
        overrides["train_min_steps"] = STARTER_FINE_TUNE_MIN_STEPS if args.min_steps is None else args.min_steps
    return Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=f"sqlite+aiosqlite:///{directory / 'magpie.db'}", models_dir=directory / "models",
        base_model=base_model, device="cpu", seed=0, train_threads=args.threads, torch_threads=args.threads,
        rate_limit_per_minute=10_000, models_keep=0, **overrides,
    )  # fmt: skip


async def train_once(settings: Settings, db: Database, scores: Scores) -> dict[str, Any]:
    run_id = await runs.create(db, triggered_by="bench", notify=None, now=datetime.now(UTC))
    assert isinstance(run_id, int)
    started = time.perf_counter()
    await retrain(settings, run_id, emit=lambda event: None)
    scores.train_s.append(time.perf_counter() - started)
    outcome = await runs.conclude(db, run_id, reason_if_running="bench", now=datetime.now(UTC))
    print(f"  run #{run_id}: {outcome.status.value} {outcome.reason or ''} metrics: {_brief(outcome.metrics)}")
    return outcome.metrics


def _brief(metrics: dict[str, Any]) -> str:
    keys = ("train_samples", "eval_samples", "train_loss", "eval_loss", "active_eval_loss", "steps", "targets")
    return json.dumps({k: metrics[k] for k in ("recall_probe", *keys) if k in metrics})


async def with_service(settings: Settings, db: Database, work: Any) -> Any:
    """Runs `work(service)` with an engine serving the active version (or BASE_MODEL)."""
    async with db.sessions() as session:
        active = await get_active_version(session)
    ref = ModelRef(active.path, active.name, active.id) if active else ModelRef(settings.base_model, "base")
    engine = Engine.from_settings(settings)
    await engine.start(ref)
    try:
        return await work(ChatService(settings=settings, db=db, engine=engine))
    finally:
        await engine.close()


async def model_row(name: str, base_model: str, args: argparse.Namespace, scale: Scale) -> tuple[Scores, Path]:
    directory = Path(tempfile.mkdtemp(prefix=f"magpie-learning-{name}-"))
    settings = bench_settings(directory, base_model, args, scratch=name == "tiny")
    await upgrade(settings.database_url)
    db = Database.connect(settings.database_url)
    scores = Scores()
    groups, teachers = community(scale, args.seed)
    try:
        logged = await with_service(settings, db, lambda service: log_community(service, groups))
        print(f"{name}: logged {logged} messages from {scale.people} people in 3 groups")
        scores.logged = logged
        await train_once(settings, db, scores)
        await with_service(settings, db, lambda service: probe(service, scores, forgotten=None))
        print(f"  {name}: {table({name: scores})[-1]}", flush=True)  # in case the /forget half does not finish
        if not args.no_forget:
            await forget_and_retrain(settings, db, teachers[0], scores)
            await with_service(settings, db, lambda service: probe(service, scores, forgotten=0))
    finally:
        await db.close()
    return scores, directory


async def forget_and_retrain(settings: Settings, db: Database, teachers: set[int], scores: Scores) -> None:
    """Every teacher of pair 0 sends /forget; the admin rolls back the version that learned from them."""

    async def forget(service: ChatService) -> None:
        for person in sorted(teachers):
            message = IncomingMessage("telegram", f"p{person}", ChatKind.PRIVATE, str(person), "t", "/forget", "f")
            await service.handle(message)

    await with_service(settings, db, forget)
    async with db.sessions.begin() as session:
        active = await get_active_version(session)
        if active is not None:
            await set_version_status(session, version_id=active.id, status=VersionStatus.ROLLED_BACK)
    await train_once(settings, db, scores)


def chatterbot_row(python: str, groups: Sequence[Sequence[Said]], teachers: dict[int, set[int]]) -> Scores | str:
    """ChatterBot trained on each group's log in order (its ListTrainer: every line answers the one before),
    asked the same prompts; then retrained without the forgotten teachers' lines."""
    if not Path(python).exists():
        return f"unavailable: no ChatterBot environment at {python}"
    logs = [[said.text for said in log] for log in groups]
    kept = [[s.text for s in log if s.author not in teachers[0]] for log in groups]
    prompts = {
        "taught": [q for q, _, _ in PAIRS], "paraphrased": [p for _, _, p in PAIRS], "unrelated": UNRELATED,
    }  # fmt: skip
    payload = json.dumps({"logs": logs, "kept": kept, "prompts": prompts})
    script = ROOT / "bench" / "chatterbot_peer.py"
    done = subprocess.run([python, str(script)], input=payload, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"unavailable: ChatterBot failed ({done.stderr.strip().splitlines()[-1:]})"
    answers = json.loads(done.stdout)
    scores = Scores()
    taught = [a for _, a, _ in PAIRS]
    for index, (question, answer, paraphrase) in enumerate(PAIRS):
        scores.taught += same(answers["taught"][index], answer)
        scores.paraphrased += same(answers["paraphrased"][index], answer)
        scores.echoes += is_echo(answers["taught"][index], question) + is_echo(
            answers["paraphrased"][index], paraphrase
        )
        after = answers["after_forget"][index]
        if index == 0:
            scores.forgotten_recalled += same(after, answer)
        else:
            scores.others_after_forget += same(after, answer)
            scores.echoes_after_forget += is_echo(after, question)
    scores.in_group = -1
    scores.unrelated_taught = sum(any(same(r, a) for a in taught) for r in answers["unrelated"])
    scores.train_s = answers["train_s"]
    return scores


def retrain_time_at_gpt2_small(tokens_per_message: float, args: argparse.Namespace) -> list[str]:
    """Item 7: a /retrain of 1k/10k/100k logged messages at GPT-2 small's shape with the current recipe,
    extrapolated from `--time-steps` measured optimizer steps (random weights: the speed does not depend on them)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.packing import PadCollator
    from trainer.train import fine_tune_rate

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    torch.set_num_threads(args.threads)
    model = GPT2LMHeadModel(GPT2Config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=fine_tune_rate(model.config))
    block, batch = settings.train_max_length, settings.train_batch_size
    rows = [{"input_ids": [7] * block, "labels": [7] * block} for _ in range(batch)]
    inputs = PadCollator(0)(rows)
    timings = []
    for _ in range(args.time_steps + 1):  # the first step warms up and is not counted
        started = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - started)
    step_s = sum(timings[1:]) / args.time_steps
    lines = [
        f"GPT-2 small (124M), batch {batch} x {block} tokens, {args.threads} threads: {step_s:.1f} s per optimizer "
        f"step (mean of {args.time_steps} measured steps); {tokens_per_message:.0f} training tokens per logged "
        f"message in this community (long + exchange samples), {settings.train_epochs:g} epochs:"
    ]
    for messages in (1_000, 10_000, 100_000):
        steps = settings.train_epochs * messages * tokens_per_message / (block * batch)
        lines.append(f"  {messages:>7,} messages: ~{steps:,.0f} steps, ~{steps * step_s / 3600:.1f} h (extrapolated)")
    return lines


def table(rows: dict[str, Scores | str]) -> list[str]:
    head = (
        "| row | recalled as taught | paraphrased | in a group with chatter | unrelated Q -> taught answer | "
        "echoed questions | after /forget: forgotten pair recalled | others kept | echoes after | training |"
    )
    out = [head, "|" + "---|" * 10]
    for name, scores in rows.items():
        if isinstance(scores, str):
            out.append(f"| {name} | {scores} |" + " |" * 9)
            continue
        group = "n/a" if scores.in_group < 0 else f"{scores.in_group}/10"
        train = " + ".join(f"{s:.0f} s" for s in scores.train_s)
        out.append(
            f"| {name} | {scores.taught}/10 | {scores.paraphrased}/10 | {group} | {scores.unrelated_taught}/10 | "
            f"{scores.echoes} | {scores.forgotten_recalled}/1 | {scores.others_after_forget}/9 | "
            f"{scores.echoes_after_forget} | {train} |"
        )
    return out


def tiny_model(directory: Path) -> str:
    """A 2-layer random GPT-2 with a byte-level BPE trained on the community's own words (as the tests' one)."""
    from trainer.starter_model import ModelShape, build_model, save_model, train_tokenizer

    words = [t for pair in PAIRS for t in pair] + CHATTER + UNRELATED
    tokenizer = train_tokenizer(words * 20, vocab_size=600)
    model = build_model(tokenizer, ModelShape(n_layer=2, n_embd=64, n_head=2, n_positions=256), seed=0)
    return str(save_model(model, tokenizer, directory))


def starter_model(args: argparse.Namespace) -> str:
    """The offline starter: `--starter DIR`, else the newest cached under models/bench-starter, else built there
    (`magpie bootstrap`, the full recipe or `--quick`'s 5-minute budget)."""
    if args.starter:
        return str(args.starter)
    cache = ROOT / "models" / "bench-starter"
    built = sorted(cache.glob("starter-*"))
    if not built:
        env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{cache / 'starter.db'}", "MODELS_DIR": str(cache)}
        magpie = [sys.executable, "-m", "bot"]
        subprocess.run([*magpie, "db", "upgrade"], env=env, check=True)
        subprocess.run([*magpie, "bootstrap", "--minutes", "5" if args.quick else "0"], env=env, check=True)
        built = sorted(cache.glob("starter-*"))
    return str(built[-1])


def tokens_per_message(directory: Path, logged: int) -> float:
    """Training tokens per logged message in the first run of a row (from its version's metrics). The held-out
    part's messages count too, so this slightly underestimates: a /retrain trains on about 90% of the log."""
    metrics = sorted((directory / "models").glob("v*/metrics.json"))
    if not metrics or not logged:
        return 0.0
    return float(json.loads(metrics[0].read_text()).get("train_tokens", 0)) / logged


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="6 teachers per pair instead of 12; a 5-min starter")
    parser.add_argument("--rows", default="starter,tiny,chatterbot")
    parser.add_argument("--starter", type=Path, help="an offline starter directory to reuse")
    parser.add_argument("--epochs", type=float, help="TRAIN_EPOCHS for the runs (default: the setting's)")
    parser.add_argument("--learning-rate", type=float, help="TRAIN_LEARNING_RATE (default: the setting's)")
    parser.add_argument("--min-steps", type=int, help="TRAIN_MIN_STEPS (default: the setting's; 0: epochs alone)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-forget", action="store_true", help="skip the /forget half (one training run per row)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-steps", type=int, default=2, help="GPT-2 small steps timed for item 7 (0: skip)")
    parser.add_argument(
        "--chatterbot-python", default=str(ROOT / "models" / "chatterbot-venv" / "bin" / "python"),
        help="a Python with chatterbot==1.2.15 installed (pip install '.[bench]' in a venv of its own)",
    )  # fmt: skip
    return parser.parse_args(argv)


async def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    scale = QUICK if args.quick else FULL
    print(f"CPU: {cpu_description()}; {os.cpu_count()} cores; load average at start {os.getloadavg()}")
    wanted = args.rows.split(",")
    rows: dict[str, Scores | str] = {}
    last: tuple[Path, int] | None = None
    for name in wanted:
        if name == "chatterbot":
            groups, teachers = community(scale, args.seed)
            rows["ChatterBot 1.2.15"] = chatterbot_row(args.chatterbot_python, groups, teachers)
            continue
        base = starter_model(args) if name == "starter" else tiny_model(Path(tempfile.mkdtemp(prefix="magpie-tiny-")))
        scores, directory = await model_row(name, base, args, scale)
        rows[name], last = scores, (directory, scores.logged)
        for example in scores.examples:
            print(f"  {example}")
    print(f"\nload average at the end {os.getloadavg()}\n")
    print("\n".join(table(rows)))
    if args.time_steps and last is not None:
        print("\n" + "\n".join(retrain_time_at_gpt2_small(tokens_per_message(*last), args)))


if __name__ == "__main__":
    asyncio.run(main())
