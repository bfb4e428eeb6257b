"""Progress lines: workers log them, the driver's console shows only them (see pipeline)."""

from __future__ import annotations

import logging

#: Progress lines from workers carry this mark; the driver forwards only these.
PROGRESS_MARK = "[raypipe]"
_log = logging.getLogger("raypipe")


def progress(message: str) -> None:
    """One progress line for the driver's console. Logged at WARNING so that Ray's worker
    logging level (INFO or above) never hides it."""
    _log.warning("%s %s", PROGRESS_MARK, message)
