"""What a version's score means: the held-out loss, and the perplexity derived from it, in one place.

The trainer writes both (`metrics.json`, a run's metrics) and the texts people read show them (`/status`, `/models`,
a run's report); the rule lives in core so that every one of them reads the same number the same way.
"""

from __future__ import annotations

import math

from core.i18n import N_

_OVERFLOW_LOSS = 700.0
"""exp() of a loss this large overflows a float; such a run diverged and has no perplexity worth recording."""

HUGE_LOSS = 50.0
"""From this loss on (perplexity ~5e21) a person reads "huge": the digits would say nothing more."""


def perplexity(loss: float | None) -> float | None:
    """exp(loss), the model's average uncertainty as a number of equally likely next tokens.

    None when there is no loss, when it is not a finite number, or when exp() would overflow (a diverged run): JSON
    has no infinity, and PostgreSQL refuses NaN in a JSON column.
    """
    if loss is None or not math.isfinite(loss) or loss >= _OVERFLOW_LOSS:
        return None
    return math.exp(loss)


def perplexity_text(loss: float) -> str:
    """The perplexity of `loss` for people: one decimal, or "huge" from `HUGE_LOSS` on (and for a loss that is not
    a number)."""
    value = perplexity(loss) if loss < HUGE_LOSS else None
    return N_("huge") if value is None else f"{value:.1f}"  # `core.texts` translates the word
