"""Figures (metrics) of the parts of one piece of work combined into the whole's: the shards of an
asset (assets/executor.py), the teachers of a labeling or of a round's feedback."""

import math


def combine_figures(parts: list[dict], weights: list[float] | None = None) -> dict:
    """One set of figures from the parts': integers summed, floats averaged weighted by `weights`
    (default: each part's `inputs`, else 1), anything else the first part's value."""
    combined = {}
    weights = weights or [part.get("inputs", 1) for part in parts]
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [(part[key], w) for part, w in zip(parts, weights) if part.get(key) is not None]
        if not values:
            combined[key] = None
        elif all(isinstance(v, int) and not isinstance(v, bool) for v, _ in values):
            combined[key] = sum(v for v, _ in values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in values):
            finite = [(v, w) for v, w in values if math.isfinite(v)]
            combined[key] = sum(v * w for v, w in finite) / max(1, sum(w for _, w in finite)) if finite else float("nan")
        else:
            combined[key] = values[0][0]
    return combined
