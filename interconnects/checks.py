"""Argument checks shared by every part: each raises a one-line ``ValueError`` that names the
argument as ``name=value`` (the model builder prefixes the config group, so the user reads the key as
written on the command line: ``interconnect.k=0 is out of range; ...``) and says what is accepted."""

from __future__ import annotations

from torch import Tensor


def check_choice(name: str, value, choices) -> None:
    """Unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


def check_int(name: str, value, low: int = 1) -> None:
    """Unless ``value`` is an integer (not a bool) ≥ ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is out of range; it must be an integer ≥ {low}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """Unless ``value`` is a positive (or, with ``allow_zero``, non-negative) number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name}={value!r} is out of range; it must be a number {'≥ 0' if allow_zero else '> 0'}")


def check_fraction(name: str, value) -> None:
    """Unless ``value`` is a number in [0, 1) (a dropout, a smoothing, a decay)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name}={value!r} is out of range; it must be a number in [0, 1)")


def check_fmap(fmap) -> None:
    """Unless ``fmap`` is a 4-D ``[B, C, h, w]`` tensor."""
    if not isinstance(fmap, Tensor) or fmap.dim() != 4:
        shape = tuple(fmap.shape) if isinstance(fmap, Tensor) else type(fmap).__name__
        raise ValueError(f"fmap must be a 4-D tensor [B, C, h, w], got {shape}")
