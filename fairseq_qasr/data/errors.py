"""The one exception type for bad input data."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data (missing/corrupt audio, malformed manifest or transcript, ...).

    The message always names the offending file, prefixed by its location when known
    (e.g. ``data/ls/test.tsv:12: ...``), and is meant to be shown to the user as-is.
    """


def located(where: str, message: str) -> str:
    """Prefix ``message`` with ``where: `` when ``where`` is non-empty."""
    return f"{where}: {message}" if where else message
