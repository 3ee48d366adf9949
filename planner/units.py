"""The one size parser of memplan: every entry point turns "8GB", "7.5 GiB" or 512 into bytes here."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_ACCEPTED = "an int (bytes) or a string like '8GB' (8*10**9), '8GiB' (8*2**30), '7.5 GB', '512MiB'"


def parse_size(value: int | str) -> int:
    """Return `value` in bytes. Decimal units (kB, MB, GB, TB) are powers of 10, binary ones (KiB...) powers of 2."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"size {value!r} is not understood: give {_ACCEPTED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value!r} is negative: give {_ACCEPTED}")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"size {value!r} is not understood: give {_ACCEPTED}")
    number, unit = match.groups()
    return int(round(float(number) * _UNITS[(unit or "").lower()]))


def format_size(n_bytes: float) -> str:
    """Human-readable bytes in GiB/MiB (binary), as the allocator reports them."""
    if abs(n_bytes) >= 2**30:
        return f"{n_bytes / 2**30:.2f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"
