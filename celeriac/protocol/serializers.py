"""Serializers by name and content type.

JSON (orjson) is the default and the only content accepted unless the app widens
``accept_content``. Values JSON cannot carry natively travel as kombu's tagged objects
(``{"__type__": "datetime", "__value__": "..."}``) so Celery peers decode them the same way.
Pickle exists only for users who name it explicitly.
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any

import orjson

from celeriac.exceptions import ContentDisallowed, DecodeError, ImproperlyConfigured


@dataclass(frozen=True, slots=True)
class Serializer:
    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


# -- JSON -------------------------------------------------------------------------------

_TAG = "__type__"
_JSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS


def _json_default(obj: Any) -> Any:
    # datetime must be tested before date: a datetime is also a date.
    if isinstance(obj, datetime):
        return {_TAG: "datetime", "__value__": obj.isoformat()}
    if isinstance(obj, date):
        return {_TAG: "date", "__value__": obj.isoformat()}
    if isinstance(obj, time):
        return {_TAG: "time", "__value__": obj.isoformat()}
    decimal = sys.modules.get("decimal")  # no Decimal can exist unless it was imported
    if decimal is not None and isinstance(obj, decimal.Decimal):
        return {_TAG: "decimal", "__value__": str(obj)}
    if isinstance(obj, uuid.UUID):
        return {_TAG: "uuid", "__value__": {"hex": obj.hex}}
    if isinstance(obj, bytes | bytearray | memoryview):
        # kombu's two forms: UTF-8 text as "bytes", anything else as "base64".
        raw = bytes(obj)
        try:
            return {_TAG: "bytes", "__value__": raw.decode("utf-8")}
        except UnicodeDecodeError:
            import base64  # here: only bytes arguments need it (worker memory)

            return {_TAG: "base64", "__value__": base64.b64encode(raw).decode("ascii")}
    if isinstance(obj, set | frozenset):
        return list(obj)
    json_method = getattr(obj, "__json__", None)
    if json_method is not None:
        return json_method()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_TAG_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "decimal": lambda v: __import__("decimal").Decimal(v),
    "uuid": lambda v: uuid.UUID(**v) if isinstance(v, dict) else uuid.UUID(v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: __import__("base64").b64decode(v),
}


def _untag(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 2 and _TAG in obj and "__value__" in obj:
            decoder = _TAG_DECODERS.get(obj[_TAG])
            if decoder is not None:
                return decoder(obj["__value__"])
        return {k: _untag(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_untag(v) for v in obj]
    return obj


# What orjson writes for a uuid.UUID (it never hands one to ``default``).
_UUID_TEXT = re.compile(rb'"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"')


def _tag_uuids(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return {_TAG: "uuid", "__value__": {"hex": obj.hex}}
    if isinstance(obj, dict):
        return {k: _tag_uuids(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_tag_uuids(v) for v in obj]
    return obj


def json_dumps(obj: Any) -> bytes:
    try:
        data = orjson.dumps(obj, default=_json_default, option=_JSON_OPTIONS)
    except TypeError as exc:
        if "Integer exceeds 64-bit range" in str(exc):
            # orjson refuses big ints; the stdlib does not.
            import json

            return json.dumps(obj, default=_json_default).encode()
        raise
    if b"-" in data and _UUID_TEXT.search(data) is not None and _has_uuid(obj):
        # orjson writes a UUID as a plain string, kombu as a tagged object that decodes
        # back to a UUID. Only output holding a UUID-shaped string can contain one (most
        # such strings are just ids: task_id, parent_id, ...), so the walk that tags them
        # and the second encoding are paid for only when a UUID object is really there.
        data = orjson.dumps(_tag_uuids(obj), default=_json_default, option=_JSON_OPTIONS)
    return data


_PLAIN = (str, int, float, bytes, type(None))


def _has_uuid(obj: Any) -> bool:
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, list | tuple):
        return isinstance(obj, uuid.UUID)
    return any(not isinstance(value, _PLAIN) and _has_uuid(value) for value in obj)


def json_loads(data: bytes | str) -> Any:
    value = orjson.loads(data)
    # Walking the tree is only needed when a tagged value is present; most messages have none.
    if isinstance(data, bytes | bytearray):
        tagged = b'"__type__"' in data
    else:
        tagged = '"__type__"' in data
    if tagged:
        return _untag(value)
    return value


def _msgpack() -> Serializer:
    try:
        import msgpack
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImproperlyConfigured(
            "serializer 'msgpack' needs the msgpack package: pip install 'celeriac[msgpack]'"
        ) from exc

    def dumps(obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=True, default=_json_default)

    def loads(data: bytes) -> Any:
        return _untag(msgpack.unpackb(data, raw=False, strict_map_key=False))

    return Serializer("msgpack", "application/x-msgpack", "binary", dumps, loads)


def _pickle() -> Serializer:
    import pickle

    def dumps(obj: Any) -> bytes:
        return pickle.dumps(obj, protocol=4)

    return Serializer(
        "pickle", "application/x-python-serialize", "binary", dumps, pickle.loads
    )


JSON = Serializer("json", "application/json", "utf-8", json_dumps, json_loads)

_FACTORIES: dict[str, Callable[[], Serializer]] = {
    "json": lambda: JSON,
    "msgpack": _msgpack,
    "pickle": _pickle,
}
_NAME_BY_CONTENT_TYPE = {
    "application/json": "json",
    "application/x-msgpack": "msgpack",
    "application/x-python-serialize": "pickle",
    "application/data": "raw",
    "application/x-yaml": "yaml",
}
_CONTENT_TYPE_BY_NAME = {name: ct for ct, name in _NAME_BY_CONTENT_TYPE.items()}
_cache: dict[str, Serializer] = {}


def serializer_names() -> list[str]:
    return list(_FACTORIES)


def by_name(name: str, setting: str = "task_serializer") -> Serializer:
    """The serializer called ``name``; an unknown name fails naming ``setting``."""
    found = _cache.get(name)
    if found is None:
        factory = _FACTORIES.get(name)
        if factory is None:
            raise ImproperlyConfigured(
                f"{setting}={name!r}: unknown serializer; choose one of {serializer_names()}"
            )
        found = _cache[name] = factory()
    return found


def content_type_of(name_or_type: str) -> str:
    """Normalise an ``accept_content`` entry (a name or a content type) to a content type."""
    if "/" in name_or_type:
        return name_or_type
    try:
        return _CONTENT_TYPE_BY_NAME[name_or_type]
    except KeyError:
        raise ImproperlyConfigured(
            f"accept_content: unknown serializer {name_or_type!r}; "
            f"choose from {sorted(_CONTENT_TYPE_BY_NAME)}"
        ) from None


def accepted_types(accept: Iterable[str]) -> frozenset[str]:
    return frozenset(content_type_of(item) for item in accept)


def loads(
    data: bytes, content_type: str, content_encoding: str, accept: frozenset[str]
) -> Any:
    """Decode a body, refusing content types that are not accepted."""
    if content_type not in accept:
        raise ContentDisallowed(
            f"Refusing to deserialize untrusted content of type {content_type!r}"
        )
    name = _NAME_BY_CONTENT_TYPE.get(content_type)
    if name is None or name not in _FACTORIES:
        raise ContentDisallowed(f"no serializer for content type {content_type!r}")
    try:
        return by_name(name).loads(data)
    except ContentDisallowed:
        raise
    except Exception as exc:
        raise DecodeError(f"cannot decode {content_type} body: {exc}") from exc
