"""Small declarative validators for JSON records read from untrusted files.

Every checker takes the value and its path in the record (e.g. "tensors[3].shape") and either
returns the value or raises `EqkFormatError` naming that path. Records are described by
composing checkers, so a new header field is one more entry in a `record(...)` table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .layout import EqkFormatError

Check = Callable[[Any, str], Any]
_MAX_INT = (1 << 63) - 1


def fail(path: str, message: str) -> EqkFormatError:
    return EqkFormatError(f"{path}: {message}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any, low: int = 0, high: int = _MAX_INT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def integer(low: int = 0, high: int = _MAX_INT) -> Check:
    def check(value, path):
        if not is_int(value, low, high):
            raise fail(path, f"expected an int in [{low}, {high}], got {_shown(value)}")
        return value

    return check


def boolean(value, path):
    if not isinstance(value, bool):
        raise fail(path, f"expected true or false, got {_shown(value)}")
    return value


def string(max_len: int = 4096, pattern: str | None = None) -> Check:
    compiled = re.compile(pattern) if pattern else None

    def check(value, path):
        if not isinstance(value, str) or not 0 < len(value) <= max_len:
            raise fail(path, f"expected a non-empty string of at most {max_len} characters")
        if compiled is not None and not compiled.fullmatch(value):
            raise fail(path, f"{_shown(value)} does not match {pattern}")
        return value

    return check


def one_of(*accepted) -> Check:
    def check(value, path):
        if not any(value == a and type(value) is type(a) for a in accepted):
            raise fail(path, f"expected one of {list(accepted)}, got {_shown(value)}")
        return value

    return check


def optional(inner: Check) -> Check:
    def check(value, path):
        return None if value is None else inner(value, path)

    return check


def any_object(value, path):
    if not isinstance(value, dict):
        raise fail(path, f"expected a JSON object, got {type(value).__name__}")
    return value


def list_of(item: Check, min_len: int = 0, max_len: int = 1 << 20) -> Check:
    def check(value, path):
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise fail(path, f"expected a list of {min_len} to {max_len} items")
        for i, v in enumerate(value):
            item(v, f"{path}[{i}]")
        return value

    return check


def dict_of(value_check: Check, key_check: Check | None = None, min_len: int = 0,
            max_len: int = 1 << 20) -> Check:  # fmt: skip
    key_check = key_check or string()

    def check(value, path):
        if not isinstance(value, dict) or not min_len <= len(value) <= max_len:
            raise fail(path, f"expected an object of {min_len} to {max_len} entries")
        for k, v in value.items():
            key_check(k, f"{path} key")
            value_check(v, f"{path}[{k!r}]")
        return value

    return check


def record(fields: dict[str, Check], optional_keys: tuple[str, ...] = ()) -> Check:
    """An object with exactly the keys of `fields` (those in `optional_keys` may be absent);
    unknown keys are allowed (later minor versions add keys)."""

    def check(value, path):
        if not isinstance(value, dict):
            raise fail(path, f"expected a JSON object, got {type(value).__name__}")
        for key, field_check in fields.items():
            if key not in value:
                if key in optional_keys:
                    continue
                raise fail(path, f"missing key {key!r}")
            field_check(value[key], f"{path}.{key}")
        return value

    return check
