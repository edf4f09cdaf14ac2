"""celeriac's AMQP codec cross-checked against a maintained implementation: py-amqp.

py-amqp (the ``amqp`` package, Celery's own client through kombu) is what a Celery client
or worker uses to write and read the field tables and basic properties of every task
message and result. Randomised tables of the types Celery headers carry (str, ints of
every width, bool, float, None, nested tables and arrays, bytes, timestamps, decimals) and
randomised basic properties go both ways:

* encoded by celeriac (``encode_table``/``encode_properties``), decoded by py-amqp
  (``serialization.loads('F')``/``decode_properties_basic``);
* encoded by py-amqp (``serialization.dumps('F')``/``Message._serialize_properties``),
  decoded by celeriac.

Seeds are fixed, so a failure names a reproducible case. Where the two libraries map a
type differently by design, the expected value is normalised and the reason is given.
"""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from amqp import serialization
from amqp.basic_message import Message as PyAmqpMessage

from celeriac.brokers import amqp_client as wire

SEEDS = range(40)
TEXT = string.ascii_letters + string.digits + " -_.:/@{}[]\"'é漢🙂"


def _key(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + "-_.") for _ in range(rng.randint(1, 24)))


def _scalar(rng: random.Random) -> Any:
    kind = rng.choice(["str", "int8", "int32", "int64", "bool", "float", "none", "bytes",
                       "datetime", "decimal", "empty"])
    if kind == "str":
        return "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 40)))
    if kind == "int8":
        return rng.randint(-128, 127)
    if kind == "int32":
        return rng.randint(-(2**31) + 1, 2**31 - 1)
    if kind == "int64":
        return rng.choice([1, -1]) * rng.randint(2**31, 2**63 - 1)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.uniform(-1e12, 1e12)
    if kind == "none":
        return None
    if kind == "bytes":
        # Not valid UTF-8 (a 0xff byte), so both decoders keep it as bytes.
        return b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 16)))
    if kind == "datetime":
        return datetime.fromtimestamp(rng.randint(0, 4_000_000_000), UTC)
    if kind == "decimal":
        # AMQP decimals: an unsigned scale octet and a signed 32-bit value.
        return Decimal(rng.randint(-(2**31) + 1, 2**31 - 1)).scaleb(-rng.randint(0, 9))
    return ""


def _value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth < 3 and roll < 0.12:
        return _table(rng, depth + 1)
    if depth < 3 and roll < 0.24:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return _scalar(rng)


def _table(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    return {_key(rng): _value(rng, depth) for _ in range(rng.randint(0, 12))}


def celery_headers(rng: random.Random) -> dict[str, Any]:
    """A Celery protocol v2 header table, with random values of the right shapes."""
    task_id = "".join(rng.choice("0123456789abcdef-") for _ in range(36))
    return {
        "lang": "py", "task": f"proj.tasks.t{rng.randint(0, 99)}", "id": task_id,
        "shadow": None, "eta": rng.choice([None, "2030-01-01T00:00:00+00:00"]),
        "expires": None, "group": rng.choice([None, task_id]),
        "group_index": rng.choice([None, rng.randint(0, 10_000)]),
        "retries": rng.randint(0, 5), "timelimit": [rng.choice([None, 30]), None],
        "root_id": task_id, "parent_id": None, "argsrepr": "(2, 2)", "kwargsrepr": "{}",
        "origin": f"gen{rng.randint(1, 99999)}@host", "ignore_result": rng.random() < 0.5,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        "x-celeriac-deliveries": rng.randint(0, 5),
        "x-celeriac-props": {"extra": {"delivery_info": {"exchange": "", "routing_key": "q"}},
                             "added": ["delivery_mode"]},
        "x-celeriac-not-before": rng.uniform(1.7e9, 1.9e9),
    }


def normalise(value: Any, *, bytes_as_text: bool = False) -> Any:
    """Compare across the two libraries' documented mappings.

    * timestamps: py-amqp gives naive datetimes in UTC, celeriac aware ones; both are
      whole seconds on the wire;
    * bytes: py-amqp writes them as long strings ('S'), which celeriac reads back as text
      when they are valid UTF-8 (``bytes_as_text``) and as bytes otherwise;
    * tuples travel as arrays and come back as lists.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).replace(microsecond=0)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if bytes_as_text:
            try:
                return raw.decode()
            except UnicodeDecodeError:
                return raw
        return raw
    if isinstance(value, dict):
        return {k: normalise(v, bytes_as_text=bytes_as_text) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalise(v, bytes_as_text=bytes_as_text) for v in value]
    return value


def ours_to_pyamqp(table: dict[str, Any]) -> Any:
    raw = wire.encode_table(table)
    (decoded,), offset = serialization.loads("F", wire._U32.pack(len(raw)) + raw, 0)
    assert offset == 4 + len(raw)
    return decoded


def pyamqp_to_ours(table: dict[str, Any]) -> dict[str, Any]:
    framed = serialization.dumps("F", [table])
    (size,) = wire._U32.unpack_from(framed, 0)
    assert size == len(framed) - 4
    return wire.decode_table(framed, 4, len(framed))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_tables_celeriac_to_pyamqp(seed: int) -> None:
    rng = random.Random(seed)
    table = _table(rng)
    assert normalise(ours_to_pyamqp(table)) == normalise(table)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_tables_pyamqp_to_celeriac(seed: int) -> None:
    rng = random.Random(1000 + seed)
    table = _table(rng)
    assert normalise(pyamqp_to_ours(table)) == normalise(table, bytes_as_text=True)


@pytest.mark.parametrize("seed", range(10))
def test_celery_headers_both_ways(seed: int) -> None:
    headers = celery_headers(random.Random(seed))
    assert normalise(ours_to_pyamqp(headers)) == normalise(headers)
    assert normalise(pyamqp_to_ours(headers)) == normalise(headers)


def test_integer_widths_both_ways() -> None:
    """Every width either library writes: py-amqp uses 'I' and 'L' (signed 64)."""
    values = [0, 1, -1, 127, -128, 255, 32767, -32768, 65535, 2**31 - 1, -(2**31) + 1,
              -(2**31), 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]
    table = {f"k{i}": v for i, v in enumerate(values)}
    assert ours_to_pyamqp(table) == table
    assert pyamqp_to_ours(table) == table


def test_field_letters_pyamqp_reads_and_writes() -> None:
    """Single values in each type letter, as py-amqp encodes them, read by celeriac."""
    cases: dict[str, Any] = {
        "s": "text", "i": 7, "big": 2**40, "neg": -(2**40), "t": True, "f": False,
        "d": 1.5, "v": None, "x": b"\xff\x00", "dec": Decimal("12.345"),
        "ts": datetime(2030, 1, 2, 3, 4, 5), "arr": [1, "a", None, [2.5]],
        "tab": {"nested": {"deeper": [True]}},
    }
    got = pyamqp_to_ours(cases)
    assert normalise(got) == normalise(cases, bytes_as_text=True)
    assert isinstance(got["dec"], Decimal) and got["dec"] == Decimal("12.345")


_SHORT = string.ascii_letters + string.digits + "-_./"


def _properties(rng: random.Random) -> dict[str, Any]:
    def short() -> str:
        return "".join(rng.choice(_SHORT) for _ in range(rng.randint(0, 60)))

    props: dict[str, Any] = {
        "content_type": rng.choice(["application/json", "application/x-msgpack", short()]),
        "content_encoding": rng.choice(["utf-8", "binary", short()]),
        "headers": rng.choice([celery_headers(rng), _table(rng), {}]),
        "delivery_mode": rng.choice([1, 2]),
        "priority": rng.randint(0, 255),
        "correlation_id": short(),
        "reply_to": short(),
        "expiration": str(rng.randint(1, 10**9)),
        "message_id": short(),
        "timestamp": rng.randint(0, 2**40),
        "type": short(),
        "user_id": "guest",
        "app_id": short(),
        "cluster_id": short(),
    }
    # A random subset: absent properties must stay absent (their flag bit unset).
    return {k: v for k, v in props.items() if rng.random() < 0.7}


@pytest.mark.parametrize("seed", range(30))
def test_basic_properties_celeriac_to_pyamqp(seed: int) -> None:
    props = _properties(random.Random(seed))
    raw = wire.encode_properties(props)
    decoded, offset = serialization.decode_properties_basic(raw, 0)
    assert offset == len(raw)
    if "application_headers" in decoded:
        decoded["headers"] = decoded.pop("application_headers")
    assert normalise(decoded) == normalise(props)


@pytest.mark.parametrize("seed", range(30))
def test_basic_properties_pyamqp_to_celeriac(seed: int) -> None:
    props = _properties(random.Random(500 + seed))
    theirs = dict(props)
    if "headers" in theirs:
        theirs["application_headers"] = theirs.pop("headers")
    raw = PyAmqpMessage(b"", **theirs)._serialize_properties()
    decoded = wire.decode_properties(raw, 0)
    assert normalise(decoded) == normalise(props)


def test_property_flags_match_pyamqp_bit_for_bit() -> None:
    """Same properties, same bytes: the flag word and the field order are the spec's."""
    rng = random.Random(7)
    for _ in range(50):
        props = _properties(rng)
        props.pop("headers", None)  # (table key order and int widths may differ)
        theirs = PyAmqpMessage(b"", **props)._serialize_properties()
        assert wire.encode_properties(props) == theirs, props
