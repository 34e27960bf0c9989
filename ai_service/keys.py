"""Storage key rules (CONTRACT.md, "Common rules"), shared by messages and storage.

Kept free of any I/O import so that request validation and the BE-side CLI stay fast.
"""

from __future__ import annotations

import re

from ai_service.errors import UnsafeKey

MAX_KEY_CHARS = 1024
#: NUL and the other control characters (a regex: a listing checks a thousand keys).
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Return ``key`` if it is a safe relative storage key, else raise UnsafeKey.

    Safe means: relative, no ``..`` or ``.`` segment, no empty segment except a trailing
    ``/``, no backslash, no NUL or other control character, at most 1,024 characters.
    """
    if not isinstance(key, str):
        raise UnsafeKey("storage key must be a string")
    if key == "":
        if allow_empty:
            return key
        raise UnsafeKey("storage key must not be empty")
    if len(key) > MAX_KEY_CHARS:
        raise UnsafeKey(f"storage key is longer than {MAX_KEY_CHARS} characters")
    if "\\" in key:
        raise UnsafeKey("storage key must not contain a backslash")
    if _CONTROL.search(key):
        raise UnsafeKey("storage key must not contain NUL or control characters")
    if key.startswith("/"):
        raise UnsafeKey("storage key must be relative (no leading '/')")
    parts = key[:-1].split("/") if key.endswith("/") else key.split("/")
    for part in parts:
        if part == "..":
            raise UnsafeKey("storage key must not contain a '..' segment")
        if part == ".":
            raise UnsafeKey("storage key must not contain a '.' segment")
        if part == "":
            raise UnsafeKey("storage key must not contain an empty segment ('//')")
    return key
