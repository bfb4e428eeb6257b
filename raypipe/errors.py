"""Errors a user can fix: the CLI prints them as one line and exits non-zero; `find_user_error`
digs one out of the wrappers Ray puts around an error raised in a worker or task."""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's config, data or environment, with what to do about it."""


def find_user_error(exc: BaseException) -> UserError | None:
    """Ray wraps errors raised in workers and tasks; dig out a raypipe UserError if there is one."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, UserError) and not isinstance(cause, UserError):
            # Ray Data appends its retry advice to the message; the user's line comes first.
            lines = str(e).strip().splitlines()
            return e if len(lines) <= 1 else UserError(lines[0])
        for attr in ("__cause__", "__context__", "cause"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
        # Train V2 collects per-worker errors in a dict.
        for attr in ("worker_failures", "_worker_failures"):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                stack.extend(v for v in failures.values() if isinstance(v, BaseException))
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                stack.append(arg)
    return None
