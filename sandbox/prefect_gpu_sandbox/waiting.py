"""Waiting for a condition, with a deadline that fails loudly: the one way this project waits.

A *check* is a callable that either passes or fails. It fails by raising ``AssertionError`` (a
test's ``assert``) or by returning ``False`` (a predicate such as "does the server answer?"); any
other result passes and is handed back, so a check can return what it found.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar, cast

__all__ = ["WaitTimeout", "eventually", "holds"]

T = TypeVar("T")


class WaitTimeout(TimeoutError, AssertionError):
    """A condition did not come true in time (or stopped holding): a timeout to the sandbox, a
    failed assertion to a test."""


_NOT_YET = object()


def _attempt(check: Callable[[], T]) -> tuple[T | object, AssertionError | None]:
    """The check's result, or _NOT_YET and the AssertionError (None for a False predicate)."""
    try:
        result = check()
    except AssertionError as error:
        return _NOT_YET, error
    return (_NOT_YET if result is False else result), None


def _describe(check: Callable[..., object], what: str | None) -> str:
    return what or str(getattr(check, "__name__", repr(check)))


def eventually(
    check: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str | None = None,
    alive: Callable[[], bool] | None = None,
) -> T:
    """Call ``check`` until it passes and return its result.

    At ``timeout`` seconds raise WaitTimeout naming ``what`` and chained to the check's last
    AssertionError, so the failure shows what was still wrong. ``alive`` lets a caller fail at
    once (RuntimeError) when the process it waits for has died.
    """
    deadline = time.monotonic() + timeout
    while True:
        result, error = _attempt(check)
        if result is not _NOT_YET:
            return cast(T, result)
        if alive is not None and not alive():
            raise RuntimeError(f"{_describe(check, what)}: the process exited before it was ready")
        if time.monotonic() >= deadline:
            detail = f": {error}" if error is not None and str(error) else ""
            message = f"{_describe(check, what)}: not true after {timeout:g} s{detail}"
            raise WaitTimeout(message) from error
        time.sleep(interval)


def holds(
    check: Callable[[], object],
    *,
    duration: float,
    interval: float = 0.05,
    what: str | None = None,
) -> None:
    """Call ``check`` for ``duration`` seconds; it must pass every time (the opposite of
    ``eventually``). Raises WaitTimeout at the first failure, saying when it happened."""
    start = time.monotonic()
    while True:
        result, error = _attempt(check)
        elapsed = time.monotonic() - start
        if result is _NOT_YET:
            detail = f": {error}" if error is not None and str(error) else ""
            message = f"{_describe(check, what)}: stopped holding after {elapsed:.2f} s{detail}"
            raise WaitTimeout(message) from error
        if elapsed >= duration:
            return
        time.sleep(min(interval, max(0.0, duration - elapsed)))
