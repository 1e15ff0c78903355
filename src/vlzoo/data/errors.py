"""The one error type of the data layer."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data: a missing or corrupt image, an annotation that points nowhere, a degenerate
    box, an empty mask, malformed JSON, a refs file that does not belong to its instances file.

    The message names the file and the record id so the user can find and fix the record.
    """
