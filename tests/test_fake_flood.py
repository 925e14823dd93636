"""The fake Bot API's flood limits (`tests/fake_flood.py`): Telegram's budgets, its 429 shape, and the switch.

The limiter is checked on a clock the test moves; the wire test checks what a client sees of it."""

from __future__ import annotations

import aiohttp
import pytest

from tests.fake_flood import Budget, FloodControl, FloodLimits
from tests.fake_telegram import FakeTelegram


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def send(flood: FloodControl, chat_id: int | str, method: str = "sendMessage") -> int | None:
    return flood.retry_after(method, {"chat_id": chat_id, "text": "hi"})


def test_a_private_chat_takes_a_short_burst_then_one_message_a_second(clock: Clock) -> None:
    flood = FloodControl(clock=clock)
    assert [send(flood, 1001) for _ in range(4)] == [None, None, None, 1]
    assert send(flood, 1002) is None, "another chat has a budget of its own"
    clock.now += 0.4
    assert send(flood, 1001) == 1, "still more than the grace too early"
    clock.now += 0.6
    assert [send(flood, 1001), send(flood, 1001)] == [None, 1]
    assert flood.refused == 3


def test_a_group_takes_20_messages_a_minute_and_says_how_long_to_wait(clock: Clock) -> None:
    flood = FloodControl(clock=clock)
    assert all(send(flood, -100500) is None for _ in range(20))
    assert send(flood, -100500) == 3, "one message per 3 s refills"
    assert send(flood, "@somechannel") is None, "a channel named by @name is a group-like chat of its own"
    clock.now += 3
    assert send(flood, -100500) is None


def test_the_bot_budget_counts_every_call_naming_a_chat_and_nothing_else(clock: Clock) -> None:
    flood = FloodControl(FloodLimits(per_bot=Budget(rate=30, burst=30)), clock=clock, grace_s=0)
    answers = [send(flood, 2000 + n, "sendChatAction") for n in range(30)]
    assert answers == [None] * 30
    assert flood.retry_after("getUpdates", {"timeout": 30}) is None, "calls about the bot itself are free"
    assert send(flood, 3000) == 1, "typing spends the bot's budget too"
    clock.now += 0.04  # a little over 1/30 s
    assert send(flood, 3000) is None


def test_refused_calls_are_not_charged_and_the_limits_can_be_switched_off(clock: Clock) -> None:
    flood = FloodControl(FloodLimits(per_private_chat=Budget(rate=1, burst=1)), clock=clock, grace_s=0)
    assert [send(flood, 1001) for _ in range(5)] == [None, 1, 1, 1, 1]
    clock.now += 1
    assert send(flood, 1001) is None, "the four refusals did not push the next slot back"
    flood.limits = FloodLimits.UNLIMITED
    assert [send(flood, 1001) for _ in range(100)] == [None] * 100


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        Budget(rate=0, burst=1)


async def test_on_the_wire_a_flood_gets_telegrams_exact_429_and_nothing_is_posted() -> None:
    async with FakeTelegram() as telegram, aiohttp.ClientSession() as client:
        alice = telegram.user(1001, "Alice")
        telegram.private_chat(alice)
        url = f"{telegram.base_url}{telegram.token}/sendMessage"
        answers = []
        for n in range(4):
            async with client.post(url, json={"chat_id": alice.id, "text": f"answer {n}"}) as response:
                answers.append((response.status, await response.json()))
    assert [status for status, _ in answers] == [200, 200, 200, 429]
    assert answers[3][1] == {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 1",
        "parameters": {"retry_after": 1},
    }
    assert [m["text"] for m in telegram.sent_messages(alice.id)] == ["answer 0", "answer 1", "answer 2"]
    assert [call.status for call in telegram.calls_to("sendMessage")] == [200, 200, 200, 429]
