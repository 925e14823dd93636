"""The one perplexity rule: what the trainer records and what people read."""

from __future__ import annotations

import json
import math

import pytest

from core.perplexity import HUGE_LOSS, perplexity, perplexity_text


def test_perplexity_is_exp_of_the_loss_while_it_means_something() -> None:
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(0.0) == 1.0
    for meaningless in (None, math.nan, math.inf, 800.0):
        assert perplexity(meaningless) is None
    json.dumps({"perplexity": perplexity(1e6)}, allow_nan=False)  # a diverged run still writes valid JSON


def test_perplexity_for_people() -> None:
    assert perplexity_text(2.0) == "7.4"
    assert perplexity_text(HUGE_LOSS - 0.5) == f"{math.exp(HUGE_LOSS - 0.5):.1f}"
    assert perplexity_text(HUGE_LOSS) == perplexity_text(800.0) == perplexity_text(math.nan) == "huge"
