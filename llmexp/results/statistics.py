"""The statistics results are made of: means, the standard error of a mean, the index of a best score, pass@k,
and McNemar's test of two models graded on the same items.

One implementation of each, for every technique that measures (plugins reach them through
``llmexp.sdk``). Plain Python over sequences of numbers (flags count as 0 and 1), summed in
order, so a figure does not move with the library that happens to compute it.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean of ``values`` (``True`` counts 1); NaN when there are none, rather than a made-up 0."""
    values = [float(value) for value in values]
    return sum(values) / len(values) if values else float("nan")


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample variance, n - 1); 0 for fewer than two.

    Of per-item differences between two evaluations of the same items, it is the paired
    standard error of the difference of their means.
    """
    n = len(values)
    if n < 2:
        return 0.0
    average = sum(values) / n
    return math.sqrt(sum((value - average) ** 2 for value in values) / (n - 1) / n)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties, as numpy's argmax (and so lm-evaluation-harness) picks."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased pass@k from ``n`` samples of which ``c`` pass: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): no factorials, no overflow
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value of paired right/wrong grades: ``gained`` items only the second model got right,
    ``lost`` items only the first did.

    Under the null hypothesis (neither model better) each discordant item is a fair coin, so the p-value is the
    two-sided binomial tail of ``min(gained, lost)`` in ``gained + lost`` trials (the exact test, which small
    discordant counts need; the chi-squared approximation is for large ones). 1.0 when no item differs.
    """
    if gained < 0 or lost < 0:
        raise ValueError(f"McNemar needs counts of at least 0; got gained={gained}, lost={lost}")
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)
