"""Errors a user can fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A problem in the user's config, data or environment, with what to do about it."""
