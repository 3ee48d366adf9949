"""Progress bars for long work (profiling, search): tqdm on stderr, on by default only in a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

from planner.errors import ArgumentError

T = TypeVar("T")


def resolve(progress: bool | None) -> bool:
    """`None` (the default everywhere) means: show progress when stderr is a terminal, never in a pipe or log."""
    if progress is None:
        return sys.stderr.isatty()
    if not isinstance(progress, bool):
        raise ArgumentError(f"progress={progress!r} is not valid: give True, False or None (None: only in a terminal)")
    return progress


def bar(items: Iterable[T], desc: str, enabled: bool, total: int | None = None) -> Iterable[T]:
    """`items`, with a bar on stderr when `enabled` (it disappears when done, leaving the log lines readable)."""
    if not enabled:
        return items
    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
