"""The exception type the core raises for bad inputs (its message names the input and the fix), and the
range check every numeric setting goes through (so NaN and inf are refused too: they pass `<` and `>`)."""

from __future__ import annotations

import math


class ResidualError(ValueError):
    """advice: where the fix is a step in the user interface (connect a node, use another node), its key
    in the interface's words (nodes/advice.py, which appends them); the core itself names no UI."""

    def __init__(self, message: str, advice: str | None = None):
        super().__init__(message)
        self.advice = advice


class TrainingDiverged(ResidualError):
    """The training loss became NaN or inf; the residual was put back to its last state with a finite loss."""

    def __init__(self, message: str, step: int, kept_step: int):
        super().__init__(message)
        self.step = step  # 1-based step whose loss was not finite
        self.kept_step = kept_step  # the residual is as it was after this many steps


def check_range(name: str, value: float, low: float, high: float, hint: str = "", low_open: bool = False) -> None:
    """Raise a ResidualError naming `name` unless low <= value <= high (low < value with low_open)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (low < value if low_open else low <= value) \
        and value <= high
    if not ok:
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ResidualError(f"{name} must be in {span}, got {value!r}." + (f" {hint}" if hint else ""))
