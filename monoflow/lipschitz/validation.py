"""Argument checks shared by the Lipschitz layers and their builders: positive integers, a
Lipschitz coefficient in (0, 1), and an int-or-pair size."""
from __future__ import annotations

from typing import Sequence, Tuple, Union


def _check_positive_int(value: int, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    return value


def _check_coeff(value: float, name: str) -> float:
    # Lip(g) < 1 is what makes the blocks invertible; a bound of 1 or more guarantees nothing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1), got {value!r}")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1 (the blocks need Lip(g) < 1), got {value}")
    return value


def _pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    else:
        pair = tuple(value)  # type: ignore[assignment]
        if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return pair  # type: ignore[return-value]
