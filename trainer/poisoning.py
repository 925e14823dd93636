"""The Tay defences that act on the whole dataset: a person's near-duplicate targets count once, no account owns
more than its share of the targets, and whatever was dropped as a target is never learned as context either.

Limits (see docs/privacy-and-safety.md): the cap works per account, so coordinated accounts are bounded only by the
blocklist and the promotion gate; different people giving the same answer is agreement and is kept.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from fractions import Fraction

from trainer.filters import normalise, stable_fraction
from trainer.samples import Sample


def drop_near_duplicates(samples: Iterable[Sample], excluded: Counter[str]) -> list[Sample]:
    """Keeps a user's first target of each normalised text; repeats by the same author are flooding.

    Different people giving the same answer is kept: that agreement is what the model should learn, and the
    per-user share cap bounds what any one account can add.
    """
    seen: set[tuple[str, str]] = set()
    kept = []
    for sample in sorted(samples, key=lambda s: s.target.message_id or 0):
        key = (sample.target.speaker, normalise(sample.target.text))
        if key in seen:
            excluded["near_duplicate_target"] += 1
            continue
        seen.add(key)
        kept.append(sample)
    return kept


def cap_user_share(samples: Sequence[Sample], cap: float, excluded: Counter[str]) -> list[Sample]:
    """Keeps no author above `cap` of the targets that remain, each capped author keeping a hash-chosen (stable,
    time-spread) subset of the same size; authors under the limit keep everything."""
    by_author: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_author[sample.target.speaker].append(sample)
    limit = share_limit([len(author_samples) for author_samples in by_author.values()], cap)
    keep: set[int] = set()
    for author_samples in by_author.values():
        ranked = sorted(author_samples, key=lambda s: stable_fraction(f"{s.conversation}/{s.target.message_id}"))
        keep.update(id(s) for s in ranked[:limit])
        excluded["user_share_cap"] += max(0, len(ranked) - limit)
    return [s for s in samples if id(s) in keep]


def share_limit(counts: Sequence[int], cap: float) -> int:
    """The most targets one author may keep so that, after capping, nobody owns more than `cap` of the rest.

    The limit must count the flooder out of its own base: `cap x all targets` lets one account with 1,000 lines
    among 50 honest ones keep most of the data. With a limit L each author keeps min(n, L) of the total
    T(L) = sum(min(n, L)), and L is the largest value with min(L, max n) <= cap' x T(L). `cap'` is `cap`, or an
    equal share (1 / authors) when fewer than 1/cap people contributed, so a small group still trains. The slack
    cap' x T(L) - L is concave in L and holds at L = 1, so the values that fit form a range a bisection finds.
    """
    if not counts:
        return 0
    share = max(Fraction(cap).limit_denominator(10**6), Fraction(1, len(counts)))
    largest = max(counts)

    def fits(limit: int) -> bool:
        return min(limit, largest) <= share * sum(min(n, limit) for n in counts)

    low, high = 1, largest  # fits(1) always holds: every author has at least one target
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def unlearn_dropped_targets(kept: Sequence[Sample], candidates: Iterable[Sample]) -> list[Sample]:
    """Marks every context line whose message was dropped as a target (a near-duplicate, over the share cap) as not
    learnable: it stays context for the lines after it, but would otherwise be learned there after all."""
    dropped = {s.target.message_id for s in candidates} - {s.target.message_id for s in kept} - {None}
    return [_unlearn(sample, dropped) for sample in kept] if dropped else list(kept)


def _unlearn(sample: Sample, message_ids: set[int | None]) -> Sample:
    if not any(line.message_id in message_ids for line in sample.context):
        return sample
    context = tuple(
        replace(line, learnable=False) if line.message_id in message_ids else line for line in sample.context
    )
    return replace(sample, context=context)
