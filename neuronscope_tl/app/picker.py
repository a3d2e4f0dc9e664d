"""Picking neurons without typing indices: rules such as "lowest 5% of layer 12 by wanda", rectangles brushed on
the layer x neuron map, and the candidate basket the Impact, Batch and Prune parts of the app share.

Pure functions over a ``[n_layers, d_mlp]`` score array (a registered score of :mod:`neuronscope_tl.scores`,
low = prune first); the app supplies the array from its calibration.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

Pair = Tuple[int, int]
BASKET_COLUMNS = ["layer", "neuron"]

_RULE = re.compile(
    r"^\s*(?P<side>lowest|highest)\s+(?P<amount>\d+(?:\.\d+)?)\s*(?P<pct>%?)\s*(?:neurons?\s+)?of\s+"
    r"(?:(?P<all>all layers|every layer)|layers?\s+(?P<first>\d+)(?:\s*(?:-|to)\s*(?P<last>\d+))?)"
    r"\s+by\s+(?P<method>\w+)\s*$",
    re.IGNORECASE,
)
RULE_EXAMPLE = "lowest 5% of layer 12 by wanda"


@dataclass(frozen=True)
class Rule:
    """A selection rule: the ``lowest`` or ``highest`` ``amount`` (a percentage of each layer when ``percent``,
    else a count per layer) of layers ``first..last`` by ``method``."""

    side: str
    amount: float
    percent: bool
    first: int
    last: int
    method: str

    def per_layer(self, d_mlp: int) -> int:
        """Neurons taken from each layer: a percentage rounds to the nearest count, at least 1."""
        k = round(self.amount / 100 * d_mlp) if self.percent else int(self.amount)
        return max(1, min(d_mlp, k))


def parse_rule(text: str, n_layers: int, d_mlp: int, methods: Sequence[str]) -> Rule:
    """Read a rule such as ``lowest 5% of layer 12 by wanda``, ``highest 10 of layers 3-5 by activation`` or
    ``lowest 1% of all layers by magnitude``; a ValueError says what is wrong."""
    m = _RULE.match(str(text or ""))
    if not m:
        raise ValueError(
            f"cannot read the rule {text!r}; write it like '{RULE_EXAMPLE}', 'highest 10 of layers 3-5 "
            f"by activation' or 'lowest 1% of all layers by magnitude'."
        )
    method = m["method"].lower()
    if method not in methods:
        raise ValueError(f"unknown score {m['method']!r} in the rule; choose one of {', '.join(methods)}.")
    if m["all"]:
        first, last = 0, n_layers - 1
    else:
        first = int(m["first"])
        last = int(m["last"]) if m["last"] is not None else first
    if not 0 <= first <= last < n_layers:
        raise ValueError(f"layers {first}..{last} are out of range; valid layers are 0..{n_layers - 1}.")
    amount, percent = float(m["amount"]), bool(m["pct"])
    if percent and not 0 < amount <= 100:
        raise ValueError(f"a percentage must be in (0, 100], got {amount:g}%.")
    if not percent and (not amount.is_integer() or not 1 <= amount <= d_mlp):
        raise ValueError(f"a count must be an integer in 1..{d_mlp}, got {m['amount']}.")
    return Rule(m["side"].lower(), amount, percent, first, last, method)


def apply_rule(rule: Rule, values: np.ndarray) -> List[Pair]:
    """The neurons the rule selects from ``values`` [n_layers, d_mlp]: per layer, the ``per_layer`` lowest (or
    highest) by value, ties by index; sorted by (layer, neuron)."""
    values = np.asarray(values, dtype=np.float64)
    k = rule.per_layer(values.shape[1])
    chosen = []
    for layer in range(rule.first, rule.last + 1):
        row = values[layer] if rule.side == "lowest" else -values[layer]
        order = np.argsort(row, kind="stable")[:k]
        chosen += [(layer, int(n)) for n in sorted(order.tolist())]
    return chosen


def rectangle(a: Pair, b: Pair) -> List[Pair]:
    """Every neuron in the rectangle with corners ``a`` and ``b`` (inclusive), as (layer, neuron)."""
    (l0, n0), (l1, n1) = a, b
    return [(l, n) for l in range(min(l0, l1), max(l0, l1) + 1) for n in range(min(n0, n1), max(n0, n1) + 1)]


def as_pairs(table) -> List[Pair]:
    """The (layer, neuron) pairs of a basket table (a DataFrame or rows), skipping empty rows."""
    if table is None:
        return []
    rows = (
        table[BASKET_COLUMNS].values.tolist()
        if isinstance(table, pd.DataFrame) and len(table)
        else ([] if isinstance(table, pd.DataFrame) else list(table))
    )
    out = []
    for row in rows:
        if len(row) < 2 or any(v is None or str(v).strip() == "" or (isinstance(v, float) and math.isnan(v)) for v in row[:2]):
            continue
        out.append((int(float(row[0])), int(float(row[1]))))
    return out


def add(basket: Iterable[Pair], new: Iterable[Pair], limit: int) -> List[Pair]:
    """The basket with ``new`` appended (duplicates dropped, order kept); a ValueError past ``limit`` neurons."""
    seen, out = set(), []
    for pair in list(basket) + list(new):
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    if len(out) > limit:
        raise ValueError(
            f"the basket would hold {len(out):,} neurons; at most {limit:,}. Select fewer (a smaller "
            f"percentage or rectangle), or clear the basket first."
        )
    return out


def basket_table(
    basket: Sequence[Pair],
    scores: Optional[pd.DataFrame] = None,
    columns: Sequence[str] = (),
    impacts: Optional[pd.DataFrame] = None,
) -> pd.DataFrame:
    """One row per basket neuron: layer, neuron, the calibration's score ``columns`` (``scores`` has one row per
    (layer, neuron)), and, when ``impacts`` (a batch analysis's ``individual`` table) covers it, its measured
    impact and verdict."""
    t = pd.DataFrame(list(basket), columns=BASKET_COLUMNS)
    if scores is not None and columns and len(t):
        t = t.merge(scores[BASKET_COLUMNS + list(columns)], on=BASKET_COLUMNS, how="left")
    if impacts is not None and len(t) and len(impacts):
        measured = impacts[["layer", "neuron", "impact_score", "verdict"]].drop_duplicates(BASKET_COLUMNS, keep="last")
        t = t.merge(measured, on=BASKET_COLUMNS, how="left")
    return t


def single_layer(basket: Sequence[Pair]) -> Tuple[int, List[int], int]:
    """(layer, its neurons, neurons left out) for the Impact tab, which ablates one layer: the basket's first
    layer."""
    if not basket:
        raise ValueError("the basket is empty; pick neurons on the Neuron map tab first.")
    layer = basket[0][0]
    neurons = [n for l, n in basket if l == layer]
    return layer, neurons, len(basket) - len(neurons)
