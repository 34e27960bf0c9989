"""Key rules at the storage boundary: the contract's rule plus what storage adds.

The rule itself (relative, no ``..``/``.``/empty segment, no backslash or control
character, at most 1,024 characters) lives in :mod:`ai_service.keys`, which request
validation imports without pulling in any storage code.  This module builds on it:
messages that show the offending key, and the object/folder distinction that only
storage needs.
"""

from __future__ import annotations

from ai_service import keys as _rule
from ai_service.errors import UnsafeKey

MAX_KEY_LENGTH = _rule.MAX_KEY_CHARS


def show(key: str) -> str:
    """The key as it may appear in an error message: quoted, escaped, shortened."""
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Return ``key`` unchanged if it is a safe storage key, else raise UnsafeKey.

    The rules are the contract's, kept in one place (:mod:`ai_service.keys`, shared with
    request validation): relative, no ``..`` or ``.`` segment, no backslash, no NUL or
    other control character, no empty segment (``a//b``) except one trailing ``/`` (a
    folder-style prefix), at most 1024 characters.  ``.`` segments are refused because
    ``a/./b`` is one file locally but another object in S3 (and SeaweedFS rejects it).
    The message here also shows the offending key.
    """
    try:
        return _rule.validate_key(key, allow_empty=allow_empty)
    except UnsafeKey as exc:
        if not isinstance(key, str) or key == "":
            raise
        raise UnsafeKey(f"{exc.message}: {show(key)}") from None


def object_key(key: str) -> str:
    """Validate a key that names one object (not a folder)."""
    validate_key(key)
    if key.endswith("/"):
        raise UnsafeKey(f"storage key {show(key)} names a folder, not an object")
    return key


def folder(prefix: str, *, allow_empty: bool) -> str:
    """Validate a prefix and return it folder-style: ``""`` or ending in ``/``."""
    validate_key(prefix, allow_empty=allow_empty)
    if prefix == "" or prefix.endswith("/"):
        return prefix
    return prefix + "/"
