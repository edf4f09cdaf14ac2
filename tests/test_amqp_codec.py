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


# -- every field type, as raw bytes --------------------------------------------------------------
#
# The decoder has fast paths (the types of a task message's headers inlined in the table
# loop, strings sliced from a latin-1 copy of the buffer unless a table or string is not
# ASCII, empty tables and arrays without a call). These tables are written byte by byte by
# an encoder independent of both libraries, with every type letter RabbitMQ or py-amqp may
# send, and read by both: the results must agree (and match what was written).

_ASCII = string.ascii_letters + string.digits + " -_.:/@{}[]\"'"


def _raw_str(raw: bytes) -> bytes:
    return wire._U32.pack(len(raw)) + raw


def _raw_item(rng: random.Random, depth: int, ascii_only: bool) -> tuple[bytes, Any]:
    """(encoded value with its type letter, the value a decoder must give)."""
    letters = "SSSVVItlLbBsuUifdTDx" + ("FA" if depth < 3 else "")
    letter = rng.choice(letters)
    if letter == "S":
        length = rng.choice([0, 1, 5, 36, 127, 128, 255, 256, 300, 70_000])
        if ascii_only or rng.random() < 0.5:
            text = "".join(rng.choice(_ASCII) for _ in range(length))
        else:
            text = "".join(rng.choice(TEXT) for _ in range(length))
        if not ascii_only and rng.random() < 0.15:  # not UTF-8: stays bytes
            raw = b"\xff" + text.encode()
            return b"S" + _raw_str(raw), raw
        return b"S" + _raw_str(text.encode()), text
    if letter == "V":
        return b"V", None
    if letter == "t":
        value = rng.choice([0, 1, 2, 255]) if not ascii_only else rng.choice([0, 1])
        return b"t" + bytes([value]), value != 0
    small = ascii_only  # no byte >= 0x80 in the encoding
    if letter == "I":
        v = rng.randint(0, 0x7F) if small else rng.choice(
            [0, -1, 2**31 - 1, -(2**31), rng.randint(-(2**31), 2**31 - 1)])
        return b"I" + wire._I32.pack(v), v
    if letter in "lL":
        v = rng.randint(0, 0x7F) if small else rng.choice(
            [0, -1, 2**63 - 1, -(2**63), 2**31, rng.randint(-(2**63), 2**63 - 1)])
        return letter.encode() + wire._I64.pack(v), v
    if letter == "b":
        v = rng.randint(0, 0x7F) if small else rng.randint(-128, 127)
        return b"b" + wire._I8.pack(v), v
    if letter == "B":
        v = rng.randint(0, 0x7F) if small else rng.randint(0, 255)
        return b"B" + wire._U8.pack(v), v
    if letter in "sU":  # signed 16-bit (RabbitMQ's 's', py-amqp's 'U')
        v = rng.randint(0, 0x7F) if small else rng.randint(-(2**15), 2**15 - 1)
        return letter.encode() + wire._I16.pack(v), v
    if letter == "u":
        v = rng.randint(0, 0x7F) if small else rng.randint(0, 2**16 - 1)
        return b"u" + wire._U16.pack(v), v
    if letter == "i":
        v = rng.randint(0, 0x7F) if small else rng.choice([0, 2**32 - 1, rng.randint(0, 2**32 - 1)])
        return b"i" + wire._U32.pack(v), v
    if letter == "f":
        v = wire._F32.unpack(wire._F32.pack(rng.uniform(-1e6, 1e6)))[0]
        return b"f" + wire._F32.pack(v), v
    if letter == "d":
        v = rng.choice([0.0, -0.5, 1e300, rng.uniform(-1e12, 1e12)])
        return b"d" + wire._F64.pack(v), v
    if letter == "T":
        v = rng.randint(0, 0x7F) if small else rng.randint(0, 4_000_000_000)
        return b"T" + wire._U64.pack(v), datetime.fromtimestamp(v, UTC)
    if letter == "D":
        scale = rng.randint(0, 9)
        v = rng.randint(0, 0x7F) if small else rng.randint(-(2**31), 2**31 - 1)
        return b"D" + bytes([scale]) + wire._I32.pack(v), Decimal(v).scaleb(-scale)
    if letter == "x":
        raw = bytes(rng.randrange(0x80 if small else 256) for _ in range(rng.randint(0, 20)))
        return b"x" + _raw_str(raw), raw
    if letter == "F":
        raw, table = _raw_table(rng, depth + 1, ascii_only)
        return b"F" + _raw_str(raw), table
    parts, items = [], []
    for _ in range(rng.choice([0, 1, 2, 5])):
        raw, value = _raw_item(rng, depth + 1, ascii_only)
        parts.append(raw)
        items.append(value)
    return b"A" + _raw_str(b"".join(parts)), items


def _raw_table(rng: random.Random, depth: int = 0, ascii_only: bool = False
               ) -> tuple[bytes, dict[str, Any]]:
    parts, table = [], {}
    for _ in range(rng.choice([0, 1, 3, 19, 40])):
        key = "".join(rng.choice(_ASCII if ascii_only else TEXT)
                      for _ in range(rng.choice([0, 1, 8, 60])))
        rawkey = key.encode()[:255]
        key = rawkey.decode("utf-8", "surrogateescape")
        if key in table:
            continue
        raw, value = _raw_item(rng, depth, ascii_only)
        parts.append(bytes([len(rawkey)]) + rawkey + raw)
        table[key] = value
    return b"".join(parts), table


@pytest.mark.parametrize("seed", range(60))
def test_every_field_type_raw_both_libraries(seed: int) -> None:
    rng = random.Random(3000 + seed)
    raw, expected = _raw_table(rng, ascii_only=seed % 2 == 0)
    # Whole table, at an offset inside a larger buffer (as in a frame), bytes and bytearray.
    framed = b"\x01\x02" + raw + b"\xce"
    ours = wire.decode_table(framed, 2, 2 + len(raw))
    assert ours == expected
    assert wire.decode_table(bytearray(framed), 2, 2 + len(raw)) == expected
    (theirs,), offset = serialization.loads("F", _raw_str(raw), 0)
    assert offset == 4 + len(raw)
    assert normalise(theirs) == normalise(ours)
    # Exact types, not just equal values (True == 1, 1.0 == 1).
    assert _types(ours) == _types(expected)


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value)


def test_keys_and_strings_that_are_not_ascii() -> None:
    """Keys: UTF-8, or surrogate-escaped when not UTF-8; long strings: text, or bytes."""
    entries = [
        (b"ascii", b"S" + _raw_str(b"plain")),
        ("clé".encode(), b"S" + _raw_str("漢字🙂".encode())),
        (b"\xffbad", b"S" + _raw_str(b"\xfe\xff")),
        (b"", b"S" + _raw_str(b"")),
        (b"k" * 255, b"S" + _raw_str(b"v" * 300)),
        (b"t", b"F" + _raw_str(b"\x04cl\xc3\xa9" + b"S" + _raw_str("é".encode()))),
        (b"a", b"A" + _raw_str(b"S" + _raw_str("é".encode()) + b"S" + _raw_str(b"\xc3")
                               + b"V" + b"I" + wire._I32.pack(-5))),
    ]
    raw = b"".join(bytes([len(k)]) + k + v for k, v in entries)
    got = wire.decode_table(raw, 0, len(raw))
    assert got == {
        "ascii": "plain", "clé": "漢字🙂", "\udcffbad": b"\xfe\xff", "": "",
        "k" * 255: "v" * 300, "t": {"clé": "é"}, "a": ["é", b"\xc3", None, -5],
    }
    assert isinstance(got["\udcffbad"], bytes) and isinstance(got["a"][1], bytes)


def test_empty_and_nested_containers() -> None:
    table = {"e": {}, "a": [], "aa": [[], {}, [[]]], "n": {"n": {"n": {"x": [1, {"y": None}]}}},
             "s": ""}
    assert wire.decode_table(wire.encode_table(table), 0, len(wire.encode_table(table))) == table
    assert pyamqp_to_ours(table) == table
    assert wire.decode_table(b"", 0, 0) == {}


def test_unknown_field_type_is_an_error() -> None:
    raw = b"\x01kZ\x00"
    with pytest.raises(wire.AMQPError, match="unknown field type"):
        wire.decode_table(raw, 0, len(raw))
    raw = b"\x01kA" + _raw_str(b"Z\x00")
    with pytest.raises(wire.AMQPError, match="unknown field type"):
        wire.decode_table(raw, 0, len(raw))


# -- basic properties: every flag word ------------------------------------------------------------


def test_properties_each_alone_and_all() -> None:
    """One decoder is compiled per flag word: each property alone, all of them, none."""
    rng = random.Random(11)
    full = _properties(random.Random(12)) | {
        "content_type": "application/json", "content_encoding": "utf-8",
        "headers": celery_headers(rng), "delivery_mode": 2, "priority": 9,
        "correlation_id": "c", "reply_to": "r", "expiration": "1000", "message_id": "m",
        "timestamp": 2**40, "type": "t", "user_id": "guest", "app_id": "a", "cluster_id": "cl"}
    cases = [{name: value} for name, value in full.items()] + [full, {}, {"headers": {}}]
    for props in cases:
        raw = wire.encode_properties(props)
        assert normalise(wire.decode_properties(b"\x00" * 12 + raw, 12)) == normalise(props)
        theirs = dict(props)
        if "headers" in theirs:
            theirs["application_headers"] = theirs.pop("headers")
        raw = PyAmqpMessage(b"", **theirs)._serialize_properties()
        assert normalise(wire.decode_properties(raw, 0)) == normalise(props)


@pytest.mark.parametrize("seed", range(5))
def test_properties_random_flag_words(seed: int) -> None:
    """Many flag words (each compiles its decoder), with strings that are not ASCII."""
    rng = random.Random(700 + seed)
    for _ in range(60):
        props = _properties(rng)
        for name in ("correlation_id", "reply_to", "type"):
            if name in props and rng.random() < 0.5:
                props[name] = "é" + props[name][:50] + "漢"
        raw = wire.encode_properties(props)
        assert normalise(wire.decode_properties(raw, 0)) == normalise(props)
        decoded, _ = serialization.decode_properties_basic(raw, 0)
        if "application_headers" in decoded:
            decoded["headers"] = decoded.pop("application_headers")
        assert normalise(decoded) == normalise(props)


def test_property_shortstr_not_utf8_is_surrogate_escaped() -> None:
    raw = wire._U16.pack(1 << 10) + b"\x03a\xffb"
    assert wire.decode_properties(raw, 0) == {"correlation_id": "a\udcffb"}


# -- the receive path: frames through Connection._process_buffer ---------------------------------


def _frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return wire._FRAME_HEAD.pack(ftype, channel, len(payload)) + payload + b"\xce"


def _deliver(channel: int, ctag: str, dtag: int, redelivered: bool, exchange: str, rkey: str,
             props: dict[str, Any], body: bytes, frame_max: int = 4096) -> bytes:
    args = (wire._shortstr(ctag) + wire._U64.pack(dtag) + bytes([redelivered])
            + wire._shortstr(exchange) + wire._shortstr(rkey))
    return _frame(1, channel, wire._METHOD.pack(60, 60) + args) + _content(channel, props, body,
                                                                           frame_max)


def _content(channel: int, props: dict[str, Any], body: bytes, frame_max: int) -> bytes:
    header = wire._CONTENT_HEAD.pack(60, 0, len(body), 0)[:12] + wire.encode_properties(props)
    out = [_frame(2, channel, header)]
    for start in range(0, len(body), frame_max):
        out.append(_frame(3, channel, body[start:start + frame_max]))
    return b"".join(out)


@pytest.mark.parametrize("seed", range(8))
def test_frames_to_deliveries(seed: int) -> None:
    """Deliveries (one, several or no body frames), a basic.get-ok and a basic.return,
    heartbeats and frames for a channel not open, fed in pieces of every size, come out
    exactly as sent."""
    rng = random.Random(900 + seed)
    conn = wire.Connection(wire.Params())
    channels = {cid: wire.Channel(conn, cid) for cid in (1, 2)}
    got: list[tuple[int, wire.Incoming]] = []
    for cid, ch in channels.items():
        ch.is_open = True
        conn.channels[cid] = ch
        ch.on_delivery = lambda msg, cid=cid: got.append((cid, msg))
    expected = []
    stream = []
    for i in range(40):
        cid = rng.choice([1, 2])
        props = _properties(rng)
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 100, 5000, 9000])))
        ctag = rng.choice(["ctag-1", "ctag-é"])
        exchange, rkey = rng.choice([("", "celery"), ("ex", "rk.é")])
        stream.append(_deliver(cid, ctag, i + 1, i % 3 == 0, exchange, rkey, props, body))
        expected.append((cid, ctag, i + 1, i % 3 == 0, exchange, rkey, props, body))
        if rng.random() < 0.2:
            stream.append(b"\x08\x00\x00\x00\x00\x00\x00\xce")  # heartbeat
        if rng.random() < 0.2:
            stream.append(_deliver(9, "x", 1, False, "", "q", {}, b"lost"))  # no channel 9
    data = b"".join(stream)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 7, 8, 100, 4096, 262144])
        conn._rbuf += data[pos:pos + step]
        pos += step
        conn._process_buffer()
    assert not conn._rbuf
    assert len(got) == len(expected)
    for (cid, msg), (ecid, ctag, dtag, redelivered, exchange, rkey, props, body) in zip(
            got, expected, strict=True):
        assert (cid, msg.consumer_tag, msg.delivery_tag, msg.redelivered, msg.exchange,
                msg.routing_key) == (ecid, ctag, dtag, redelivered, exchange, rkey)
        assert normalise(msg.properties) == normalise(props)
        assert msg.body == body and type(msg.body) is bytes

    # basic.get-ok and basic.return go to the replies and the returned list.
    ch = channels[1]
    getok = (wire._METHOD.pack(60, 71) + wire._U64.pack(77) + b"\x01" + wire._shortstr("ex")
             + wire._shortstr("rk") + wire._U32.pack(3))
    ret = (wire._METHOD.pack(60, 50) + wire._U16.pack(312) + wire._shortstr("NO_ROUTE")
           + wire._shortstr("ex") + wire._shortstr("nowhere"))
    conn._rbuf += (_frame(1, 1, getok) + _content(1, {"priority": 3}, b"abc" * 3000, 4096)
                   + _frame(1, 1, ret) + _content(1, {}, b"", 4096))
    conn._process_buffer()
    (method, _payload, msg), = ch._replies
    assert method == wire.BASIC_GET_OK and msg is not None
    assert (msg.delivery_tag, msg.redelivered, msg.exchange, msg.routing_key,
            msg.message_count, msg.properties, msg.body) == (77, True, "ex", "rk", 3,
                                                            {"priority": 3}, b"abc" * 3000)
    (returned,) = ch.returned
    assert (returned.reply_code, returned.reply_text, returned.routing_key, returned.body,
            returned.properties) == (312, "NO_ROUTE", "nowhere", b"", {})


def test_bad_frame_end_is_an_error() -> None:
    conn = wire.Connection(wire.Params())
    conn._rbuf += b"\x08\x00\x00\x00\x00\x00\x00\x00"
    with pytest.raises(wire.AMQPError, match="bad frame end"):
        conn._process_buffer()


# -- from_wire ------------------------------------------------------------------------------------


def test_from_wire_takes_out_only_our_headers() -> None:
    from celeriac.brokers.amqp import H_COUNT, H_PROPS, from_wire

    plain = {"lang": "py", "task": "t", "id": "1", "my-x-celeriac-thing": 1, "x-celeriac": 2}
    props = {"headers": dict(plain), "content_type": "application/json",
             "content_encoding": "utf-8", "priority": 0}
    message, ours = from_wire(props, b"{}")
    assert message.headers == plain and ours == {}
    assert message.properties == {"priority": 0}

    headers = dict(plain) | {H_COUNT: 3, "x-celeriac-future": "kept aside",
                             H_PROPS: {"extra": {"delivery_info": {"x": 1}},
                                       "added": ["delivery_mode"]}}
    props = {"headers": headers, "delivery_mode": 2}
    message, ours = from_wire(props, b"")
    assert message.headers == plain
    assert ours == {H_COUNT: 3, "x-celeriac-future": "kept aside",
                    H_PROPS: {"extra": {"delivery_info": {"x": 1}}, "added": ["delivery_mode"]}}
    assert message.properties == {"delivery_info": {"x": 1}}
    assert (message.content_type, message.content_encoding) == ("application/json", "utf-8")

    message, ours = from_wire({}, b"")
    assert message.headers == {} and ours == {}
