"""Many SAEs, many tests: results over SAE training seeds, and p-values corrected for every test run.

An SAE is one draw from its training (initialisation, batch order): a feature found in one SAE may
be absent, split or merged in another trained the same way, so a single SAE's numbers carry a
run-to-run variance no CI over pairs shows. :func:`mean_sd` summarises a number over seeds.

:func:`holm`: Holm's step-down correction (Holm 1979) of ``m`` p-values, family-wise error at most
``alpha`` under any dependence between the tests, and never less powerful than Bonferroni (which
multiplies every p-value by ``m``). The family is every test actually run (every site, mode and
seed), so a result is not picked from many. With a permutation p-value of ``(1 + count) / (1 +
draws)``, the smallest adjusted p-value possible is ``m / (1 + draws)``:
:func:`min_adjusted_p` says whether a test could pass at all.
"""

from __future__ import annotations

import math
from typing import Sequence


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the ``i``-th smallest (0-based) is multiplied by
    ``m - i``, made non-decreasing in that order, and capped at 1. A test passes when its adjusted
    p-value is below ``alpha``."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


def min_adjusted_p(n_tests: int, n_draws: int) -> float:
    """The smallest Holm-adjusted p-value ``n_tests`` permutation tests of ``n_draws`` draws can reach."""
    return min(1.0, n_tests / (1 + n_draws))


def mean_sd(values: Sequence[float]) -> dict:
    """Mean and sample SD over seeds (SD ``nan`` for one seed), with the values."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("mean_sd needs at least one value")
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "values": v, "n": n}


def mean_sd_text(d: dict, p: int = 3, sign: str = "") -> str:
    """:func:`mean_sd`'s output as ``mean ± SD`` (the SD left out for one value)."""
    if d["n"] < 2:
        return f"{d['mean']:{sign}.{p}f}"
    return f"{d['mean']:{sign}.{p}f} ± {d['sd']:.{p}f}"
