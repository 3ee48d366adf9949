"""The one size parser of memplan: every entry point turns "8GB", "7.5 GiB", 8e9 or 512 into bytes here."""

from __future__ import annotations

import math
import numbers
import re

from planner.errors import ArgumentError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_ACCEPTED = ("an int (bytes, numpy ints too), a whole float such as 8e9, or a string like '8GB' (8*10**9), "
             "'8GiB' (8*2**30), '7.5 GB', '512MiB'")


def parse_size(value: int | float | str) -> int:
    """Return `value` in bytes. Decimal units (kB, MB, GB, TB) are powers of 10, binary ones (KiB...) powers of 2.

    Any integer type (numpy's too) is bytes; a float is bytes when it is a whole number (8e9), since a fraction of
    a byte can only be a mistake; bools are refused (True is not a size)."""
    if isinstance(value, bool):
        raise ArgumentError(f"size {value!r} is not understood: give {_ACCEPTED}")
    if isinstance(value, numbers.Integral):
        return _non_negative(value, int(value))
    if isinstance(value, numbers.Rational):  # Fraction: exact
        if value.denominator != 1:
            raise ArgumentError(f"size {value!r} is not a whole number of bytes: give {_ACCEPTED}")
        return _non_negative(value, int(value))
    if isinstance(value, numbers.Real):  # float, numpy floats: a whole float is an exact int
        number = float(value)
        if not math.isfinite(number) or not number.is_integer():
            raise ArgumentError(f"size {value!r} is not a whole number of bytes: give {_ACCEPTED}")
        return _non_negative(value, int(number))
    if not isinstance(value, str):
        raise ArgumentError(f"size {value!r} ({type(value).__name__}) is not understood: give {_ACCEPTED}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ArgumentError(f"size {value!r} is not understood: give {_ACCEPTED}")
    number, unit = match.groups()
    n_bytes = float(number) * _UNITS[(unit or "").lower()]
    if not math.isfinite(n_bytes):
        raise ArgumentError(f"size {value!r} is too large to be a size: give {_ACCEPTED}")
    return int(round(n_bytes))


def _non_negative(value, n_bytes: int) -> int:
    if n_bytes < 0:
        raise ArgumentError(f"size {value!r} is negative: give {_ACCEPTED}")
    return n_bytes


def format_size(n_bytes: float) -> str:
    """Human-readable bytes in GiB/MiB (binary), as the allocator reports them."""
    if abs(n_bytes) >= 2**30:
        return f"{n_bytes / 2**30:.2f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"
