"""Exact-match scoring of retrieval answers and the Wilson 95% interval of an accuracy."""
from __future__ import annotations

import math
import re


def units(text: str, pattern: str = r"\d{3,}") -> list[str]:
    """Answer units in `text`, in order: runs of 3 or more digits (list markers are not answers), or names."""
    return re.findall(pattern, text)


def exact_match(text: str, expected: list[str], mode: str = "first", pattern: str = r"\d{3,}") -> bool:
    """'first': the first unit generated is expected[0]; 'all': the first len(expected) units are exactly the
    expected ones, in any order. A wrong, missing or partial number (123456 for 1234567) fails."""
    found = units(text, pattern)
    if mode == "first":
        return bool(found) and found[0] == expected[0]
    if mode == "all":
        first = found[: len(expected)]
        return len(first) == len(expected) and sorted(first) == sorted(expected)
    raise ValueError(f"unknown scoring mode '{mode}' (first | all)")


def wilson(hits: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% for the default z) of hits/trials; (0, 1) for no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = hits / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
