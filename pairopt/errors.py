"""Errors a user can act on. The CLI prints them as one paragraph, without a traceback."""

from __future__ import annotations


class PairoptError(Exception):
    """Bad input or an unsupported setup: the message says what, where, and what to do."""


class UnsupportedModelError(PairoptError):
    """The model cannot run the prefix-shared forward exactly (use share_prefix=False)."""
