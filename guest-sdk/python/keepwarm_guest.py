"""keepwarm_guest: write keepwarm plugins in Python.

A plugin module defines a `Plugin` subclass and exports it as the component's `transform`
interface by binding `Transform`::

    from keepwarm_guest import Plugin, export_plugin, ops

    class UserEmails(Plugin):
        def __init__(self, config):
            self.prefix = config.get("prefix", "user:")

        def handle(self, change):
            key = self.prefix + change.pks[0]
            if change.is_delete:
                return [ops.delete(key)]
            return [ops.set(key, change.record()["email"])]

    Transform = export_plugin(UserEmails)

The same concepts as the Rust SDK (guest-sdk/src): `Change` (typed access to one change), `ops`
(one builder per operation), `KeyTemplate` (keys such as `{schema}.{table}:{pks}`), the
manifest's `[config]` table handed to the constructor, and `log`. See guest-sdk/README.md.

Numbers: Python's `json` keeps integers exact at any size, so an `int8` id beyond 2^53 is safe.
Postgres `numeric` columns arrive as strings ("149.90", "1E-7"): keep them as strings for
storage, use `decimal.Decimal` to compute exactly, and `to_score` where a double is wanted (a
sorted-set score).

Build with componentize-py (scripts/build-python-plugin.sh), which generates the `wit_world`
bindings this module imports.
"""

from __future__ import annotations

import decimal
import json
import math
from typing import Any, Callable, Iterable, Optional, Union

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import config as _config
from wit_world.imports import log as _log
from wit_world.imports import types

__all__ = [
    "UNCHANGED_TOAST",
    "Change",
    "KeyTemplate",
    "Plugin",
    "export_plugin",
    "format_key",
    "key_part",
    "log",
    "ops",
    "to_score",
    "types",
]

UNCHANGED_TOAST = "unchanged_toast"
"""The placeholder Sequin writes for an unchanged TOASTed column of an update."""

_ACTIONS = {
    types.Action.INSERT: "insert",
    types.Action.UPDATE: "update",
    types.Action.DELETE: "delete",
    types.Action.READ: "read",
}


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return json.dumps(value)
    return f"{type(value).__name__} {value!r}"


def _parse_object(what: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def to_score(value: Union[int, float, str, decimal.Decimal]) -> float:
    """A sorted-set score from a column value: a number or a numeric string as Postgres
    `numeric` columns arrive ("149.90", "1E-7", "Infinity"). NaN is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, decimal.Decimal)):
        raise ValueError(f"not a number: {_describe(value)}")
    try:
        score = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"not a number: {_describe(value)}") from None
    if math.isnan(score):
        raise ValueError(f"not a number: {_describe(value)}")
    return score


def key_part(value: Any) -> str:
    """The text of a column value in a key or member: a string as is, an integer as its digits,
    a float as its shortest form, a boolean as `true`/`false`. None, dicts and lists are
    errors."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, decimal.Decimal)):
        return str(value)
    raise ValueError(f"{_describe(value)} cannot be part of a key")


class Change:
    """One change to one row, as the host delivered it."""

    __slots__ = (
        "wit",
        "action",
        "schema",
        "table",
        "record_json",
        "old_json",
        "pks",
        "commit_lsn",
        "commit_idx",
        "commit_timestamp",
        "idempotency_key",
        "metadata_json",
        "_record",
    )

    def __init__(self, wit: types.Change):
        self.wit = wit
        """The WIT record this change wraps."""
        self.action: str = _ACTIONS[wit.action]
        """"insert", "update", "delete" or "read" (a backfill row)."""
        self.schema: str = wit.schema
        self.table: str = wit.table
        self.record_json: str = wit.record
        """The row as JSON text, byte for byte as delivered: cache it as is."""
        self.old_json: Optional[str] = wit.changes
        """For updates, the old values of the changed columns as JSON text ("{}" when the
        table's replica identity is not FULL); None for insert, delete and read."""
        self.pks: list[str] = wit.pks
        """The primary-key values as strings, in primary-key column order."""
        self.commit_lsn: Optional[int] = wit.commit_lsn
        self.commit_idx: Optional[int] = wit.commit_idx
        self.commit_timestamp: str = wit.commit_timestamp
        self.idempotency_key: str = wit.idempotency_key
        self.metadata_json: str = wit.metadata
        self._record: Optional[dict] = None

    @property
    def is_delete(self) -> bool:
        """Whether the row is gone after this change."""
        return self.action == "delete"

    def record(self) -> dict:
        """The row, parsed once and kept. For a delete of a table without REPLICA IDENTITY FULL
        only the primary-key columns are set; the others are None."""
        if self._record is None:
            self._record = _parse_object("record", self.record_json)
        return self._record

    def old_values(self) -> Optional[dict]:
        """The old values of an update's changed columns; `{}` when the table's replica
        identity is not FULL (the old values are unknown), None for insert, delete and read."""
        return None if self.old_json is None else _parse_object("changes", self.old_json)

    def metadata(self) -> dict:
        """The `metadata` object, parsed."""
        return _parse_object("metadata", self.metadata_json)

    def version(self) -> Optional[tuple[int, int]]:
        """`(commit_lsn, commit_idx)`, or None for a backfill read."""
        if self.commit_lsn is None or self.commit_idx is None:
            return None
        return (self.commit_lsn, self.commit_idx)

    def has_unchanged_toast(self) -> bool:
        """Whether a column holds Sequin's "unchanged_toast" placeholder: a large value the
        update did not carry. Never cache such a record whole; delete it or skip the column."""
        if UNCHANGED_TOAST not in self.record_json and "\\u" not in self.record_json:
            return False
        return any(value == UNCHANGED_TOAST for value in self.record().values())


class KeyTemplate:
    """A key template such as `{schema}.{table}:{pks}`, parsed once and rendered per change:
    `{schema}`, `{table}`, `{pks}` (primary-key values joined with ":"), `{pk0}`, `{pk1}`, ...,
    `{column}` (a column of the record, see `key_part`), `{{` and `}}` for literal braces."""

    def __init__(self, text: str):
        self.text = text
        self.parts = self._parse(text)

    @classmethod
    def parse(cls, text: str) -> "KeyTemplate":
        return cls(text)

    def _fail(self, reason: str) -> None:
        raise ValueError(f"key template {json.dumps(self.text)}: {reason}")

    def _parse(self, text: str) -> list:
        if not isinstance(text, str) or text == "":
            raise ValueError("key template is empty")
        parts: list = []
        literal = ""
        i = 0
        while i < len(text):
            c = text[i]
            if c in "{}" and text[i + 1 : i + 2] == c:
                literal += c
                i += 2
                continue
            if c == "}":
                self._fail(f"unmatched '}}' at {i} (write '}}}}' for a literal brace)")
            if c == "{":
                close = text.find("}", i + 1)
                reopen = text.find("{", i + 1)
                if close < 0 or 0 <= reopen < close:
                    self._fail(f"unclosed '{{' at {i} (write '{{{{' for a literal brace)")
                name = text[i + 1 : close]
                if name == "":
                    self._fail(f"empty placeholder '{{}}' at {i}")
                if literal:
                    parts.append(literal)
                    literal = ""
                if name in ("schema", "table", "pks"):
                    parts.append((name, None))
                elif name.startswith("pk") and name[2:].isdigit() and name[2:].isascii():
                    parts.append(("pk", int(name[2:])))
                else:
                    parts.append(("column", name))
                i = close + 1
                continue
            literal += c
            i += 1
        if literal:
            parts.append(literal)
        return parts

    def render(self, change: Change) -> str:
        """The key for `change`; raises ValueError, naming the placeholder, when a value is
        missing."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            kind, arg = part
            if kind == "schema":
                out.append(change.schema)
            elif kind == "table":
                out.append(change.table)
            elif kind == "pks":
                if not change.pks:
                    self._fail("{pks}: the change has no primary-key values")
                out.append(":".join(change.pks))
            elif kind == "pk":
                if arg >= len(change.pks):
                    self._fail(
                        f"{{pk{arg}}} is past the last primary-key value "
                        f"(the change has {len(change.pks)})"
                    )
                out.append(change.pks[arg])
            else:
                record = change.record()
                if arg not in record:
                    self._fail(f'column "{arg}" is missing from the record')
                value = record[arg]
                if value is None:
                    self._fail(f'column "{arg}" is null')
                if isinstance(value, (dict, list)):
                    self._fail(f'column "{arg}" is not a string, number or boolean')
                out.append(key_part(value))
        return "".join(out)


def format_key(template: str, change: Change) -> str:
    """Renders `template` for `change`; see `KeyTemplate`."""
    return KeyTemplate(template).render(change)


# Operations ----------------------------------------------------------------------------------


def _text(what: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"{what} must be a string, got {_describe(value)}")


def _bytes(what: str, value: Any) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): U+FFFD instead
            return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value).encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, got {_describe(value)}")


def _millis(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise TypeError(f"{what} must be a whole number of milliseconds, got {_describe(value)}")
    return value


def _members(key: Any, members: Iterable[Any]) -> types.MembersOp:
    if isinstance(members, (str, bytes)):
        raise TypeError("members must be a list of strings, not one string")
    return types.MembersOp(
        key=_text("key", key), members=[_text("member", member) for member in members]
    )


class ops:
    """Builders for the cache operations, one per WIT `op` case. Keys and members take strings
    (integers are written as their digits); values take str (stored as UTF-8) or bytes;
    expiries are milliseconds. Each checks its arguments, so a mistake rejects the change with a
    message instead of trapping the instance."""

    @staticmethod
    def set(key: str, value: Union[str, bytes], ttl_ms: Optional[int] = None) -> types.Op:
        """`SET key value [PX ttl_ms]`."""
        return types.Op_Set(
            types.SetOp(
                key=_text("key", key),
                value=_bytes("value", value),
                ttl_ms=None if ttl_ms is None else _millis("ttl_ms", ttl_ms),
            )
        )

    @staticmethod
    def delete(key: str) -> types.Op:
        """`DEL key`."""
        return types.Op_Del(_text("key", key))

    @staticmethod
    def hash_set(key: str, fields: Union[dict, Iterable[tuple]]) -> types.Op:
        """`HSET key field value ...`; `fields` is a dict or `(field, value)` pairs."""
        pairs = fields.items() if isinstance(fields, dict) else fields
        return types.Op_HashSet(
            types.HashSetOp(
                key=_text("key", key),
                fields=[
                    types.FieldValue(
                        field=_text("field", field), value=_bytes(f"value of {field}", value)
                    )
                    for field, value in pairs
                ],
            )
        )

    @staticmethod
    def hash_del(key: str, fields: Iterable[str]) -> types.Op:
        """`HDEL key field ...`."""
        return types.Op_HashDel(_members(key, fields))

    @staticmethod
    def set_add(key: str, members: Iterable[str]) -> types.Op:
        """`SADD key member ...`."""
        return types.Op_SetAdd(_members(key, members))

    @staticmethod
    def set_remove(key: str, members: Iterable[str]) -> types.Op:
        """`SREM key member ...`."""
        return types.Op_SetRemove(_members(key, members))

    @staticmethod
    def sorted_set_add(key: str, scored: Iterable[tuple]) -> types.Op:
        """`ZADD key score member ...`; `scored` is `(score, member)` pairs."""
        return types.Op_SortedSetAdd(
            types.SortedSetAddOp(
                key=_text("key", key),
                members=[
                    types.ScoredMember(score=to_score(score), member=_text("member", member))
                    for score, member in scored
                ],
            )
        )

    @staticmethod
    def sorted_set_remove(key: str, members: Iterable[str]) -> types.Op:
        """`ZREM key member ...`."""
        return types.Op_SortedSetRemove(_members(key, members))

    @staticmethod
    def expire(key: str, ttl_ms: int) -> types.Op:
        """`PEXPIRE key ttl_ms`."""
        return types.Op_Expire(types.ExpireOp(key=_text("key", key), ttl_ms=_millis("ttl_ms", ttl_ms)))

    @staticmethod
    def publish(channel: str, message: Union[str, bytes]) -> types.Op:
        """`PUBLISH channel message`: an invalidation broadcast for in-process caches."""
        return types.Op_Publish(
            types.PublishOp(channel=_text("channel", channel), message=_bytes("message", message))
        )


_OP_TYPES = (
    types.Op_Set,
    types.Op_Del,
    types.Op_HashSet,
    types.Op_HashDel,
    types.Op_SetAdd,
    types.Op_SetRemove,
    types.Op_SortedSetAdd,
    types.Op_SortedSetRemove,
    types.Op_Expire,
    types.Op_Publish,
)


def _check_ops(result: Any) -> list:
    if not isinstance(result, list):
        raise TypeError(f"handle must return a list of operations, got {_describe(result)}")
    for op in result:
        if not isinstance(op, _OP_TYPES):
            raise TypeError(f"handle returned {_describe(op)} where an operation (ops.*) was expected")
    return result


# Logging, plugins, export --------------------------------------------------------------------


class log:
    """Log lines, tagged with the plugin's name and rate-limited by the host."""

    @staticmethod
    def debug(message: str) -> None:
        _log.log(types.Level.DEBUG, str(message))

    @staticmethod
    def info(message: str) -> None:
        _log.log(types.Level.INFO, str(message))

    @staticmethod
    def warn(message: str) -> None:
        _log.log(types.Level.WARN, str(message))

    @staticmethod
    def error(message: str) -> None:
        _log.log(types.Level.ERROR, str(message))


class Plugin:
    """A keepwarm plugin: built once per instance from the manifest's `[config]` table, then
    asked for the cache operations of each change."""

    def __init__(self, config: dict):
        """Validate the configuration here: an exception rejects every change with
        "plugin configuration: <message>"."""
        self.config = config

    def handle(self, change: Change) -> list:
        """The operations for one change (an empty list when it is of no interest). An
        exception rejects this change alone, with its message as the reason."""
        raise NotImplementedError("handle")

    @staticmethod
    def expect_config_keys(config: dict, known: Iterable[str]) -> None:
        """Raises when `config` has a key not in `known`, so that a misspelt key fails loudly."""
        known = list(known)
        for key in config:
            if key not in known:
                raise ValueError(f"unknown key {json.dumps(key)} (expected one of {', '.join(known)})")


def _message(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, KeyError):
        return f"missing key {text}"
    return text or type(error).__name__


def export_plugin(plugin: Callable[[dict], Plugin]) -> type:
    """Exports a plugin class as the component's `transform` interface: bind the result to
    `Transform` at the top level of the module given to componentize-py."""
    state: dict = {}

    def instance() -> Any:
        if not state:
            try:
                state["plugin"] = plugin(_parse_object("config", _config.get()))
            except Exception as error:  # noqa: BLE001 - reported as data, for every change
                state["error"] = f"plugin configuration: {_message(error)}"
        return state.get("plugin")

    class Transform(exports.Transform):
        def handle_batch(self, changes: list) -> list:
            current = instance()
            results = []
            for wit in changes:
                if current is None:
                    results.append(Err(state["error"]))
                    continue
                try:
                    results.append(Ok(_check_ops(current.handle(Change(wit)))))
                except Exception as error:  # noqa: BLE001 - a rejection, not a trap
                    results.append(Err(_message(error)))
            return results

    return Transform
