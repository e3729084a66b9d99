"""Names in the store: federations and runs as safe, reversible key segments; round folders.

Airflow run ids contain ':' and '+' (``manual__2026-05-01T12:00:00+00:00``), which some
S3 tools and file systems mishandle. Every character outside ``A-Z a-z 0-9 - _`` is
written as ``%XX`` (its UTF-8 bytes), so ids stay readable, cannot form ``.``/``..`` or a
path separator, and map back exactly.
"""

from __future__ import annotations

import re
import string
from urllib.parse import unquote

_SAFE = frozenset(string.ascii_letters + string.digits + "-_")
_ROUND = re.compile(r"round_(\d{5,})")
MAX_NAME_BYTES = 200


def encode_name(name: str, what: str = "name") -> str:
    """``name`` as one safe key segment; ``what`` says what it is in the error."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    encoded = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in name)
    if len(encoded) > MAX_NAME_BYTES:
        raise ValueError(
            f"{what} {name!r} is too long for a store key ({len(encoded)} > {MAX_NAME_BYTES} bytes encoded)"
        )
    return encoded


def decode_name(segment: str) -> str | None:
    """The name a segment was encoded from, or None for a segment this store did not write."""
    try:
        name = unquote(segment, errors="strict")
        return name if encode_name(name) == segment else None
    except (UnicodeDecodeError, ValueError):
        return None


def round_folder(round_number: int) -> str:
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
        raise ValueError(f"round must be a non-negative integer, got {round_number!r}")
    return f"round_{round_number:05d}"


def parse_round_folder(segment: str) -> int | None:
    match = _ROUND.fullmatch(segment)
    return int(match.group(1)) if match else None
