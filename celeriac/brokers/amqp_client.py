"""A small synchronous AMQP 0-9-1 client: what the RabbitMQ broker and rpc backend use.

Scope: what RabbitMQ speaks and celeriac needs, nothing more. No transactions (``tx.*``),
no exchange-to-exchange bindings, no ``basic.recover``, PLAIN authentication only, and no
generic or public API: the callers are ``celeriac/brokers/amqp.py`` and
``celeriac/backends/rpc.py``. One connection is used by one thread at a time (``lock``);
writes are also safe from a second thread (the heartbeat thread, an early ack).

Why our own and not py-amqp, pika or aiormq (docs/amqp.md section 1 has the measurements,
``bench/amqp_clients.py`` reproduces them): CPU per message. A worker that drains 10,000
tasks/s on two cores it shares with RabbitMQ has about 100 us of CPU per task for
everything it does; measured on the same RabbitMQ in one run, py-amqp spends about 40 us
of client CPU to consume a task message and about 40 us to publish one with confirms,
pika's SelectConnection about 25 and 30, this client about 10 and 10. What this client
does for that: a table decoder specialised for task headers, ``recv`` in 256 KiB chunks
with frames parsed from the buffer, pipelined writes (a batch of publishes, acks or
consumes is one ``sendall``), and confirms tracked per batch. It also keeps heartbeats
going from a per-process thread while the only other thread runs a long task (writes
hold a lock), which pika (heartbeats only inside its I/O loop) and py-amqp (writes not
thread-safe) would need a wrapper around their internals for. Waiting on the socket and
a wake-up pipe at once is ``pump(timeout, wake_fd)`` here; with py-amqp's plain TCP
transport (which reads exactly each frame's bytes) or pika's ``ioloop.add_handler`` it
would be possible too, so that is not a reason.

Every codec path is cross-checked against py-amqp in tests/test_amqp_codec.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

# (class, method) ids
CONNECTION_START = (10, 10)
CONNECTION_TUNE = (10, 30)
CONNECTION_OPEN_OK = (10, 41)
CONNECTION_CLOSE = (10, 50)
CONNECTION_CLOSE_OK = (10, 51)
CONNECTION_BLOCKED = (10, 60)
CONNECTION_UNBLOCKED = (10, 61)
CHANNEL_OPEN_OK = (20, 11)
CHANNEL_FLOW = (20, 20)
CHANNEL_CLOSE = (20, 40)
CHANNEL_CLOSE_OK = (20, 41)
EXCHANGE_DECLARE_OK = (40, 11)
EXCHANGE_DELETE_OK = (40, 21)
EXCHANGE_BIND_OK = (40, 31)
QUEUE_DECLARE_OK = (50, 11)
QUEUE_BIND_OK = (50, 21)
QUEUE_PURGE_OK = (50, 31)
QUEUE_DELETE_OK = (50, 41)
QUEUE_UNBIND_OK = (50, 51)
BASIC_QOS_OK = (60, 11)
BASIC_CONSUME_OK = (60, 21)
BASIC_CANCEL = (60, 30)
BASIC_CANCEL_OK = (60, 31)
BASIC_RETURN = (60, 50)
BASIC_DELIVER = (60, 60)
BASIC_GET_OK = (60, 71)
BASIC_GET_EMPTY = (60, 72)
BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)
BASIC_RECOVER_OK = (60, 111)
CONFIRM_SELECT_OK = (85, 11)

NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406

_FRAME_HEAD = struct.Struct(">BHI")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_METHOD = struct.Struct(">HH")
_CONTENT_HEAD = struct.Struct(">HHQH")
_DELIVER_TAIL = struct.Struct(">QB")
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class AMQPError(Exception):
    """Base of this module's errors."""


class ConnectionLost(AMQPError):
    """The connection is gone (socket error, EOF, missed heartbeats, or closed by the server).

    Whatever it held unacknowledged is back in its queues (the server requeues it).
    """


class ConnectionClosedByServer(ConnectionLost):
    def __init__(self, code: int, text: str, method: tuple[int, int] = (0, 0)) -> None:
        super().__init__(f"connection closed by the server: {code} {text}")
        self.code, self.text, self.method = code, text, method


class ChannelClosed(AMQPError):
    """The server closed a channel (a soft error: 404 not found, 406 precondition...)."""

    def __init__(self, code: int, text: str, method: tuple[int, int] = (0, 0)) -> None:
        super().__init__(f"channel closed by the server: {code} {text}")
        self.code, self.text, self.method = code, text, method


class PublishNacked(AMQPError):
    """The server refused to take responsibility for published messages (basic.nack)."""


class Unroutable(AMQPError):
    """A mandatory publish reached no queue (basic.return)."""

    def __init__(self, code: int, text: str, exchange: str, routing_key: str) -> None:
        super().__init__(f"message to exchange {exchange!r} with routing key {routing_key!r} "
                         f"was returned: {code} {text}")
        self.code, self.exchange, self.routing_key = code, exchange, routing_key


# -- field tables -------------------------------------------------------------------------------


def _read_shortstr(buf: bytes, off: int) -> tuple[str, int]:
    n = buf[off]
    off += 1
    return buf[off:off + n].decode("utf-8", "surrogateescape"), off + n


def _read_longstr_raw(buf: bytes, off: int) -> tuple[bytes, int]:
    (n,) = _U32.unpack_from(buf, off)
    off += 4
    return bytes(buf[off:off + n]), off + n


# The decoders below take the buffer twice: as bytes (``buf``) and decoded as latin-1
# (``text``, one character per byte, so the same offsets). A string is first sliced out of
# ``text``: when that slice is ASCII (``str.isascii`` is O(1)), it is what UTF-8 decoding
# would give, without a bytes slice and a decode per string (about 0.1 us each, and a task
# message's header table has ~27 strings). Otherwise the bytes are decoded as before.
_u16 = _U16.unpack_from
_u32 = _U32.unpack_from
_u64 = _U64.unpack_from
_i32 = _I32.unpack_from
_i64 = _I64.unpack_from


def _longstr_value(raw: bytes) -> str | bytes:
    """A long string that is not ASCII: text if it is UTF-8, else the bytes."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return bytes(raw)


def _read_value(buf: bytes, text: str, off: int) -> tuple[Any, int]:
    """The field value at ``buf[off]`` (its type octet) and the offset after it."""
    t = buf[off]
    off += 1
    if t == 83:  # S: long string
        (n,) = _u32(buf, off)
        off += 4
        end = off + n
        value = text[off:end]
        return (value if value.isascii() else _longstr_value(buf[off:end])), end
    if t == 86:  # V: void
        return None, off
    if t == 116:  # t: bool
        return buf[off] != 0, off + 1
    if t == 73:  # I: int32
        return _i32(buf, off)[0], off + 4
    if t == 108:  # l: int64
        return _i64(buf, off)[0], off + 8
    if t == 70:  # F: table
        (n,) = _u32(buf, off)
        off += 4
        return _table(buf, text, off, off + n), off + n
    if t == 65:  # A: array
        (n,) = _u32(buf, off)
        off += 4
        return _array(buf, text, off, off + n), off + n
    if t == 100:  # d: double
        return _F64.unpack_from(buf, off)[0], off + 8
    if t == 102:  # f: float
        return _F32.unpack_from(buf, off)[0], off + 4
    if t == 98:  # b: int8
        return _I8.unpack_from(buf, off)[0], off + 1
    if t == 66:  # B: uint8
        return buf[off], off + 1
    if t == 115:  # s: int16 (RabbitMQ)
        return _I16.unpack_from(buf, off)[0], off + 2
    if t == 117:  # u: uint16
        return _u16(buf, off)[0], off + 2
    if t == 105:  # i: uint32
        return _u32(buf, off)[0], off + 4
    if t == 84:  # T: timestamp
        return datetime.fromtimestamp(_u64(buf, off)[0], UTC), off + 8
    if t == 68:  # D: decimal
        scale = buf[off]
        (value,) = _i32(buf, off + 1)
        return Decimal(value).scaleb(-scale), off + 5
    if t == 120:  # x: byte array
        return _read_longstr_raw(buf, off)
    if t == 76:  # L: py-amqp (kombu, Celery) writes 64-bit ints so; signed, as it reads them
        return _i64(buf, off)[0], off + 8
    if t == 85:  # U: py-amqp's 16-bit (signed, as it reads it)
        return _I16.unpack_from(buf, off)[0], off + 2
    raise AMQPError(f"unknown field type {chr(t)!r} in a field table")


def _table(buf: bytes, text: str, off: int, end: int) -> dict[str, Any]:
    """The field table in ``buf[off:end]`` (the hot path: a task message's headers).

    The types a task message's headers use are decoded here without a call; the others
    (and malformed input) go through ``_read_value``, which handles every type. When the
    whole table is ASCII (a task message's usually is), so is every string in it and no
    string needs its own check.
    """
    out: dict[str, Any] = {}
    plain = text[off:end].isascii()
    while off < end:
        stop = off + 1 + buf[off]
        key = text[off + 1:stop]
        if not (plain or key.isascii()):
            key = buf[off + 1:stop].decode("utf-8", "surrogateescape")
        t = buf[stop]
        if t == 83:  # S: long string
            off = stop + 5
            stop = off + _u32(buf, stop + 1)[0]
            value = text[off:stop]
            out[key] = value if plain or value.isascii() else _longstr_value(buf[off:stop])
            off = stop
        elif t == 86:  # V: void
            out[key] = None
            off = stop + 1
        elif t == 73:  # I: int32
            out[key] = _i32(buf, stop + 1)[0]
            off = stop + 5
        elif t == 116:  # t: bool
            out[key] = buf[stop + 1] != 0
            off = stop + 2
        elif t == 70:  # F: table
            off = stop + 5
            stop = off + _u32(buf, stop + 1)[0]
            out[key] = _table(buf, text, off, stop) if stop > off else {}
            off = stop
        elif t == 65:  # A: array
            off = stop + 5
            stop = off + _u32(buf, stop + 1)[0]
            out[key] = _array(buf, text, off, stop) if stop > off else []
            off = stop
        else:
            out[key], off = _read_value(buf, text, stop)
    return out


def _array(buf: bytes, text: str, off: int, end: int) -> list[Any]:
    """The field array in ``buf[off:end]`` (Celery's ``timelimit`` is one)."""
    items: list[Any] = []
    append = items.append
    while off < end:
        t = buf[off]
        if t == 86:  # V: void
            append(None)
            off += 1
        elif t == 73:  # I: int32
            append(_i32(buf, off + 1)[0])
            off += 5
        else:
            value, off = _read_value(buf, text, off)
            append(value)
    return items


def decode_table(buf: bytes, off: int, end: int) -> dict[str, Any]:
    """The field table in ``buf[off:end]``."""
    return _table(buf, buf.decode("latin-1"), off, end)


def _encode_value(value: Any, out: list[bytes]) -> None:
    if value is None:
        out.append(b"V")
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
        out.append(b"S" + _U32.pack(len(raw)))
        out.append(raw)
    elif isinstance(value, bool):
        out.append(b"t\x01" if value else b"t\x00")
    elif isinstance(value, int):
        if -0x80000000 <= value <= 0x7FFFFFFF:
            out.append(b"I" + _I32.pack(value))
        elif -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
            out.append(b"l" + _I64.pack(value))
        else:  # no wider integer type exists: keep the digits
            raw = str(value).encode()
            out.append(b"S" + _U32.pack(len(raw)))
            out.append(raw)
    elif isinstance(value, float):
        out.append(b"d" + _F64.pack(value))
    elif isinstance(value, dict):
        raw = encode_table(value)
        out.append(b"F" + _U32.pack(len(raw)))
        out.append(raw)
    elif isinstance(value, list | tuple):
        parts: list[bytes] = []
        for item in value:
            _encode_value(item, parts)
        raw = b"".join(parts)
        out.append(b"A" + _U32.pack(len(raw)))
        out.append(raw)
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out.append(b"x" + _U32.pack(len(raw)))
        out.append(raw)
    elif isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        out.append(b"T" + _U64.pack(int(value.timestamp())))
    elif isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        scale = -int(exponent) if isinstance(exponent, int) and exponent < 0 else 0
        unscaled = int(value.scaleb(scale))
        out.append(b"D" + _U8.pack(scale) + _I32.pack(unscaled))
    else:
        raise TypeError(f"cannot put {type(value).__name__} {value!r} in an AMQP field table")


def encode_table(table: dict[str, Any] | None) -> bytes:
    if not table:
        return b""
    out: list[bytes] = []
    for key, value in table.items():
        raw = key.encode("utf-8", "surrogateescape")
        out.append(_U8.pack(len(raw)))
        out.append(raw)
        _encode_value(value, out)
    return b"".join(out)


def _shortstr(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > 255:
        raise AMQPError(f"short string longer than 255 bytes: {value[:40]!r}...")
    return _U8.pack(len(raw)) + raw


def _longstr(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


def _table_arg(table: dict[str, Any] | None) -> bytes:
    raw = encode_table(table)
    return _U32.pack(len(raw)) + raw


def _bits(*flags: bool) -> bytes:
    value = 0
    for i, flag in enumerate(flags):
        if flag:
            value |= 1 << i
    return _U8.pack(value)


# -- basic properties ---------------------------------------------------------------------------

# (name, flag bit, kind) in wire order
_PROPS: tuple[tuple[str, int, str], ...] = (
    ("content_type", 1 << 15, "s"),
    ("content_encoding", 1 << 14, "s"),
    ("headers", 1 << 13, "F"),
    ("delivery_mode", 1 << 12, "o"),
    ("priority", 1 << 11, "o"),
    ("correlation_id", 1 << 10, "s"),
    ("reply_to", 1 << 9, "s"),
    ("expiration", 1 << 8, "s"),
    ("message_id", 1 << 7, "s"),
    ("timestamp", 1 << 6, "T"),
    ("type", 1 << 5, "s"),
    ("user_id", 1 << 4, "s"),
    ("app_id", 1 << 3, "s"),
    ("cluster_id", 1 << 2, "s"),
)
PROPERTY_NAMES = frozenset(name for name, _, _ in _PROPS)


def encode_properties(props: dict[str, Any]) -> bytes:
    flags = 0
    parts: list[bytes] = []
    for name, bit, kind in _PROPS:
        value = props.get(name)
        if value is None:
            continue
        flags |= bit
        if kind == "s":
            parts.append(_shortstr(str(value)))
        elif kind == "o":
            parts.append(_U8.pack(int(value) & 0xFF))
        elif kind == "F":
            parts.append(_table_arg(value))
        else:  # T
            stamp = value.timestamp() if isinstance(value, datetime) else value
            parts.append(_U64.pack(int(stamp)))
    return _U16.pack(flags) + b"".join(parts)


def _shortstr_value(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# flag word -> the (name, kind) of each property it announces, in wire order (a publisher
# sends the same flag word every time; bit 0, "more flags", is never set for basic.*)
_PROPERTY_LAYOUTS: dict[int, tuple[tuple[str, str], ...]] = {}


def decode_properties(buf: bytes, off: int) -> dict[str, Any]:
    (flags,) = _u16(buf, off)
    if not flags:
        return {}
    layout = _PROPERTY_LAYOUTS.get(flags)
    if layout is None:
        layout = _PROPERTY_LAYOUTS[flags] = tuple(
            (name, kind) for name, bit, kind in _PROPS if flags & bit)
    off += 2
    text = buf.decode("latin-1")  # same offsets; see the field-table decoders above
    props: dict[str, Any] = {}
    for name, kind in layout:
        if kind == "s":
            stop = off + 1 + buf[off]
            value = text[off + 1:stop]
            props[name] = value if value.isascii() else _shortstr_value(buf[off + 1:stop])
            off = stop
        elif kind == "F":
            stop = off + 4 + _u32(buf, off)[0]
            props[name] = _table(buf, text, off + 4, stop) if stop > off + 4 else {}
            off = stop
        elif kind == "o":
            props[name] = buf[off]
            off += 1
        else:  # T: timestamp
            props[name] = _u64(buf, off)[0]
            off += 8
    return props


# -- parameters ---------------------------------------------------------------------------------


@dataclass
class Params:
    host: str = "127.0.0.1"
    port: int = 5672
    vhost: str = "/"
    user: str = "guest"
    password: str = "guest"
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None
    heartbeat: float = 60.0
    connect_timeout: float = 4.0
    frame_max: int = 131072
    channel_max: int = 2047
    client_name: str = "celeriac"

    def describe(self) -> str:
        scheme = "amqps" if self.ssl is not None else "amqp"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.vhost}"


def parse_url(url: str, ssl_options: Any = None, **overrides: Any) -> list[Params]:
    """``amqp://user:pass@host:port/vhost?heartbeat=30``; ``;``-separated for failover.

    The vhost follows Celery/kombu: ``amqp://host//`` and ``amqp://host/`` are ``/``,
    ``amqp://host/v1`` is ``v1``, and ``%2F`` decodes to ``/``.
    """
    out = []
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        parsed = urlsplit(part)
        scheme = parsed.scheme.split("+")[-1]
        if scheme not in ("amqp", "amqps", "pyamqp", "librabbitmq"):
            raise AMQPError(f"not an AMQP URL: {part!r}")
        tls = scheme == "amqps"
        path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        vhost = unquote(path) if path else "/"
        query = dict(parse_qsl(parsed.query))
        params = Params(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or (5671 if tls else 5672),
            vhost=vhost,
            user=unquote(parsed.username) if parsed.username else "guest",
            password=unquote(parsed.password) if parsed.password else "guest",
        )
        for key in ("heartbeat", "connect_timeout"):
            if key in query:
                setattr(params, key, float(query[key]))
        for key, value in overrides.items():
            if value is not None and hasattr(params, key):
                setattr(params, key, value)
        if tls or ssl_options or query.get("ssl") in ("1", "true"):
            params.ssl = make_ssl_context(ssl_options)
            params.server_hostname = params.host
            if not parsed.port and not tls:
                params.port = 5671
        out.append(params)
    if not out:
        raise AMQPError(f"no broker address in {url!r}")
    return out


def make_ssl_context(options: Any) -> ssl.SSLContext:
    """An SSL context from Celery's ``broker_use_ssl`` forms (True, a dict, or a context)."""
    if isinstance(options, ssl.SSLContext):
        return options
    ctx = ssl.create_default_context()
    if isinstance(options, dict):
        cafile = options.get("ca_certs") or options.get("cafile")
        if cafile:
            ctx.load_verify_locations(cafile)
        certfile = options.get("certfile")
        if certfile:
            ctx.load_cert_chain(certfile, options.get("keyfile"))
        reqs = options.get("cert_reqs")
        if reqs is not None:
            if reqs == ssl.CERT_NONE:
                ctx.check_hostname = False
            ctx.verify_mode = reqs
        if options.get("server_hostname") is False:
            ctx.check_hostname = False
    return ctx


# -- incoming messages --------------------------------------------------------------------------


@dataclass(slots=True)
class Incoming:
    """A delivered, got or returned message."""

    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    message_count: int = 0  # basic.get-ok only
    reply_code: int = 0  # basic.return only
    reply_text: str = ""


# -- heartbeats ---------------------------------------------------------------------------------

_live: weakref.WeakSet[Connection] = weakref.WeakSet()
_beat_lock = threading.Lock()
_beat_thread: list[tuple[int, threading.Thread]] = []


def _beat_forever() -> None:
    pid = os.getpid()
    while True:
        time.sleep(0.5)
        if os.getpid() != pid:
            return
        now = time.monotonic()
        for conn in list(_live):
            try:
                conn.send_heartbeat_if_idle(now)
            except Exception:  # a dead connection is noticed by its reader
                pass


def _ensure_beating() -> None:
    with _beat_lock:
        pid = os.getpid()
        if _beat_thread and _beat_thread[0][0] == pid and _beat_thread[0][1].is_alive():
            return
        thread = threading.Thread(target=_beat_forever, name="celeriac-amqp-heartbeat",
                                  daemon=True)
        thread.start()
        _beat_thread[:] = [(pid, thread)]


# -- connection ---------------------------------------------------------------------------------


class Connection:
    """One AMQP connection. Reading and channel use: one thread at a time (``lock``)."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.lock = threading.RLock()
        self._wlock = threading.Lock()
        self._rbuf = bytearray()
        self.channels: dict[int, Channel] = {}
        self._free_ids: list[int] = []
        self._next_id = 1
        self.closed = True
        self.error: BaseException | None = None
        self.heartbeat = 0.0
        self.frame_max = params.frame_max
        self.server_properties: dict[str, Any] = {}
        self.blocked = False
        self._last_send = self._last_recv = time.monotonic()
        self._pending_close: tuple[int, str, tuple[int, int]] | None = None
        self._pid = os.getpid()

    # -- opening ---------------------------------------------------------------------------------

    def connect(self) -> Connection:
        p = self.params
        try:
            raw = socket.create_connection((p.host, p.port), timeout=p.connect_timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {p.describe()}: {exc}") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock: socket.socket | ssl.SSLSocket = raw
            if p.ssl is not None:
                sock = p.ssl.wrap_socket(raw, server_hostname=p.server_hostname)
            self.sock = sock
            self.closed = False
            sock.sendall(PROTOCOL_HEADER)
            self._handshake()
        except BaseException as exc:
            self._abort()
            if isinstance(exc, AMQPError):
                raise
            if isinstance(exc, OSError | ssl.SSLError):
                raise ConnectionLost(f"cannot connect to {p.describe()}: {exc}") from exc
            raise
        self.sock.setblocking(False)
        _live.add(self)
        if self.heartbeat:
            _ensure_beating()
        return self

    def _read_method_blocking(self, timeout: float) -> tuple[tuple[int, int], bytes]:
        """During the handshake: the next method frame on channel 0."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._next_frame()
            if frame is not None:
                ftype, _ch, payload = frame
                if ftype == FRAME_METHOD:
                    cls, meth = _METHOD.unpack_from(payload, 0)
                    return (cls, meth), payload
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost(f"{self.params.describe()}: handshake timed out")
            assert self.sock is not None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise ConnectionLost(f"{self.params.describe()}: {exc}") from exc
            if not data:
                raise ConnectionLost(
                    f"{self.params.describe()}: the server closed the connection during the "
                    "handshake (wrong credentials or vhost?)"
                )
            self._rbuf += data

    def _handshake(self) -> None:
        p = self.params
        timeout = p.connect_timeout
        method, payload = self._read_method_blocking(timeout)
        if method != CONNECTION_START:
            raise AMQPError(f"expected connection.start, got {method}")
        off = 6
        (n,) = _U32.unpack_from(payload, off)
        self.server_properties = decode_table(payload, off + 4, off + 4 + n)
        client_props = {
            "product": p.client_name,
            "platform": "Python",
            "capabilities": {
                "publisher_confirms": True, "consumer_cancel_notify": True,
                "basic.nack": True, "connection.blocked": True,
                "authentication_failure_close": True, "exchange_exchange_bindings": True,
                "per_consumer_qos": True,
            },
            "connection_name": f"{p.client_name} pid {os.getpid()}",
        }
        response = b"\x00" + p.user.encode() + b"\x00" + p.password.encode()
        self._send_method(0, 10, 11, _table_arg(client_props) + _shortstr("PLAIN")
                          + _longstr(response) + _shortstr("en_US"))
        method, payload = self._read_method_blocking(timeout)
        if method == CONNECTION_CLOSE:
            code, text = _U16.unpack_from(payload, 4)[0], _read_shortstr(payload, 6)[0]
            raise ConnectionClosedByServer(code, text)
        if method != CONNECTION_TUNE:
            raise AMQPError(f"expected connection.tune, got {method}")
        channel_max, frame_max, server_hb = struct.unpack_from(">HIH", payload, 4)
        self.frame_max = min(frame_max or p.frame_max, p.frame_max)
        channel_max = min(channel_max or p.channel_max, p.channel_max)
        wanted = int(p.heartbeat)
        heartbeat = min(server_hb, wanted) if server_hb and wanted else 0
        self.heartbeat = float(heartbeat)
        self._send_method(0, 10, 31, struct.pack(">HIH", channel_max, self.frame_max, heartbeat))
        self._send_method(0, 10, 40, _shortstr(p.vhost) + _shortstr("") + b"\x00")
        method, payload = self._read_method_blocking(timeout)
        if method == CONNECTION_CLOSE:
            code, text = _U16.unpack_from(payload, 4)[0], _read_shortstr(payload, 6)[0]
            raise ConnectionClosedByServer(code, text)
        if method != CONNECTION_OPEN_OK:
            raise AMQPError(f"expected connection.open-ok, got {method}")

    # -- writing ---------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.closed or self.sock is None:
            raise self._lost_error()
        with self._wlock:
            try:
                self._sendall(data)
            except OSError as exc:
                self._fail(ConnectionLost(f"{self.params.describe()}: {exc}"))
                raise self._lost_error() from exc
            self._last_send = time.monotonic()

    def _sendall(self, data: bytes) -> None:
        sock = self.sock
        assert sock is not None
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLOUT)
                poller.poll(5000)
                continue
            except InterruptedError:
                continue
            view = view[sent:]

    def _send_method(self, channel: int, cls: int, meth: int, args: bytes) -> None:
        payload = _METHOD.pack(cls, meth) + args
        self.send(_FRAME_HEAD.pack(FRAME_METHOD, channel, len(payload)) + payload + b"\xce")

    def send_heartbeat_if_idle(self, now: float) -> None:
        if self.closed or not self.heartbeat or os.getpid() != self._pid:
            return
        if now - self._last_send >= self.heartbeat / 2:
            self.send(_HEARTBEAT)

    # -- reading ---------------------------------------------------------------------------------

    def _next_frame(self) -> tuple[int, int, bytes] | None:
        buf = self._rbuf
        if len(buf) < 7:
            return None
        ftype, channel, size = _FRAME_HEAD.unpack_from(buf, 0)
        end = 7 + size
        if len(buf) < end + 1:
            return None
        if buf[end] != FRAME_END:
            raise AMQPError("bad frame end: the stream is out of sync")
        payload = bytes(buf[7:end])
        del buf[:end + 1]
        return ftype, channel, payload

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def pump(self, timeout: float, wake_fd: int | None = None) -> bool:
        """Read and dispatch what arrives within ``timeout`` s; True if a frame came.

        Returns early when ``wake_fd`` becomes readable (it is not read here).
        """
        if self.closed:
            raise self._lost_error()
        if self._process_buffer():
            return True
        sock = self.sock
        assert sock is not None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return self._receive()
        deadline = time.monotonic() + max(0.0, timeout)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        while True:
            now = time.monotonic()
            left = deadline - now
            if self.heartbeat and now - self._last_recv > self.heartbeat * 2:
                self._fail(ConnectionLost(f"{self.params.describe()}: no heartbeat from the "
                                          f"server for {self.heartbeat * 2:.0f}s"))
                raise self._lost_error()
            wait = left
            if self.heartbeat:
                wait = min(wait, self.heartbeat / 2)
            try:
                events = poller.poll(max(0, int(wait * 1000 + 0.999)) if wait > 0 else 0)
            except InterruptedError:
                events = []
            for fd, _ev in events:
                if fd == sock.fileno():
                    if self._receive():
                        return True
                    break
            else:
                if events:  # only the wake fd
                    return False
            if left <= 0:
                return False

    def _receive(self) -> bool:
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(262144)
        except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
            return False
        except OSError as exc:
            self._fail(ConnectionLost(f"{self.params.describe()}: {exc}"))
            raise self._lost_error() from exc
        if not data:
            self._fail(ConnectionLost(f"{self.params.describe()}: the server closed the socket"))
            raise self._lost_error()
        self._last_recv = time.monotonic()
        self._rbuf += data
        return self._process_buffer()

    def _process_buffer(self) -> bool:
        buf = self._rbuf
        size_total = len(buf)
        if size_total < 8 or _FRAME_HEAD.unpack_from(buf, 0)[2] + 8 > size_total:
            got = False  # not one whole frame yet: nothing to copy
        else:
            got = self._dispatch_frames(buf, size_total)
        if self._pending_close is not None:
            code, text, method = self._pending_close
            self._pending_close = None
            with contextlib.suppress(AMQPError):
                self.send(_FRAME_HEAD.pack(FRAME_METHOD, 0, 4) + _METHOD.pack(10, 51) + b"\xce")
            self._fail(ConnectionClosedByServer(code, text, method))
            raise self._lost_error()
        return got

    def _dispatch_frames(self, buf: bytearray, size_total: int) -> bool:
        """Hand each whole frame in ``buf`` to its channel; what was handed out is removed.

        Payloads are sliced from one ``bytes`` copy of the buffer (slicing the bytearray
        and converting each slice made two copies per frame).
        """
        data = bytes(buf)
        pos = 0
        channels = self.channels
        head = _FRAME_HEAD.unpack_from
        try:
            while size_total - pos >= 8:
                ftype, channel, size = head(data, pos)
                start = pos + 7
                end = start + size
                if end >= size_total:
                    break
                if data[end] != FRAME_END:
                    raise AMQPError("bad frame end: the stream is out of sync")
                pos = end + 1
                if channel == 0:
                    self._on_connection_frame(ftype, data[start:end])
                    continue
                ch = channels.get(channel)
                if ch is not None:
                    ch._on_frame(ftype, data[start:end])
        finally:
            if pos:
                del buf[:pos]
        return True

    def _on_connection_frame(self, ftype: int, payload: bytes) -> None:
        if ftype == FRAME_HEARTBEAT:
            return
        if ftype != FRAME_METHOD:
            return
        method = _METHOD.unpack_from(payload, 0)
        if method == CONNECTION_CLOSE:
            code = _U16.unpack_from(payload, 4)[0]
            text, off = _read_shortstr(payload, 6)
            cls, meth = struct.unpack_from(">HH", payload, off)
            self._pending_close = (code, text, (cls, meth))
        elif method == CONNECTION_BLOCKED:
            self.blocked = True
        elif method == CONNECTION_UNBLOCKED:
            self.blocked = False
        elif method == CONNECTION_CLOSE_OK:
            self.closed = True

    # -- failure and closing ---------------------------------------------------------------------

    def _lost_error(self) -> ConnectionLost:
        err = self.error
        if isinstance(err, ConnectionLost):
            return err
        return ConnectionLost(f"{self.params.describe()}: connection closed")

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._abort()

    def _abort(self) -> None:
        self.closed = True
        _live.discard(self)
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        for ch in list(self.channels.values()):
            ch._on_connection_lost()

    def close(self, timeout: float = 2.0) -> None:
        """Close cleanly (the server requeues unacked deliveries); never raises."""
        if self.closed:
            self._abort()
            return
        try:
            with self.lock:
                self._send_method(0, 10, 50,
                                  _U16.pack(200) + _shortstr("bye") + b"\x00\x00\x00\x00")
                deadline = time.monotonic() + timeout
                while not self.closed and time.monotonic() < deadline:
                    self.pump(deadline - time.monotonic())
        except AMQPError:
            pass
        finally:
            self._abort()

    def abort(self) -> None:
        """Drop the socket without a goodbye (after a fork, or to simulate a crash)."""
        self._abort()

    # -- channels --------------------------------------------------------------------------------

    def channel(self) -> Channel:
        if self._free_ids:
            cid = self._free_ids.pop()
        else:
            cid = self._next_id
            self._next_id += 1
        ch = Channel(self, cid)
        self.channels[cid] = ch
        ch._open()
        return ch

    def probe(self, make: Sequence[Callable[[Channel], bytes]], reply: tuple[int, int],
              timeout: float = 30.0) -> list[bytes | ChannelClosed]:
        """Run one call per throwaway channel, all pipelined: one round trip in all.

        For calls that may fail (a passive declare of a queue that may not exist): each
        result is the reply payload or the ChannelClosed that call caused.
        """
        chans: list[Channel] = []
        frames: list[bytes] = []
        for build in make:
            cid = self._free_ids.pop() if self._free_ids else self._next_id
            if cid == self._next_id:
                self._next_id += 1
            ch = Channel(self, cid)
            ch.is_open = True
            self.channels[cid] = ch
            chans.append(ch)
            frames.append(ch._method_frame(20, 10, _shortstr("")))
            frames.append(build(ch))
        self.send(b"".join(frames))
        out: list[bytes | ChannelClosed] = []
        closing: list[Channel] = []
        for ch in chans:
            try:
                ch._expect([CHANNEL_OPEN_OK], timeout)
                _m, payload, _ = ch._expect([reply], timeout)
                out.append(payload)
                closing.append(ch)
            except ChannelClosed as exc:
                out.append(exc)
        if closing:
            self.send(b"".join(ch._method_frame(20, 40, _U16.pack(200) + _shortstr("bye")
                                                + b"\x00\x00\x00\x00") for ch in closing))
            for ch in closing:
                ch.is_open = False
                ch._expect([CHANNEL_CLOSE_OK], timeout)
                self._release_channel(ch)
        return out

    def _release_channel(self, ch: Channel) -> None:
        if self.channels.get(ch.id) is ch:
            del self.channels[ch.id]
            self._free_ids.append(ch.id)


class Channel:
    """An AMQP channel: synchronous calls, publishes with confirms, deliveries."""

    def __init__(self, conn: Connection, cid: int) -> None:
        self.conn = conn
        self.id = cid
        self.is_open = False
        self.error: BaseException | None = None
        self.deliveries: deque[Incoming] = deque()
        self._replies: deque[tuple[tuple[int, int], bytes, Incoming | None]] = deque()
        self._content: Incoming | None = None
        self._content_kind: tuple[int, int] | None = None
        self._body_parts: list[bytes] = []
        self._body_left = 0
        self.confirming = False
        self.publish_seq = 0
        self.confirmed_upto = 0  # every tag <= this is settled (acked or nacked)
        self._settled: set[int] = set()  # settled above confirmed_upto
        self.nacked: set[int] = set()
        self.returned: list[Incoming] = []
        self.cancelled_by_server: set[str] = set()
        self.on_delivery: Callable[[Incoming], None] | None = None
        self._frame_prefix = struct.pack(">BH", FRAME_METHOD, cid)

    # -- frames in -------------------------------------------------------------------------------

    def _on_frame(self, ftype: int, payload: bytes) -> None:
        # The three frames of each delivery are the hot path: body and header frames are
        # looked at first, and basic.deliver is parsed inline (no helper per string).
        if ftype == FRAME_BODY:
            if self._content is None:
                return
            left = self._body_left - len(payload)
            if left <= 0 and not self._body_parts:  # the whole body in one frame
                self._finish_content(payload)
                return
            self._body_parts.append(payload)
            self._body_left = left
            if left <= 0:
                self._finish_content(b"".join(self._body_parts))
            return
        if ftype == FRAME_HEADER:
            msg = self._content
            if msg is None:
                return
            (size,) = _u64(payload, 4)
            msg.properties = decode_properties(payload, 12)
            self._body_left = size
            if self._body_parts:
                self._body_parts = []
            if size == 0:
                self._finish_content(b"")
            return
        if ftype == FRAME_METHOD:
            cls, meth = _METHOD.unpack_from(payload, 0)
            if cls == 60:
                if meth == 60:  # deliver (hot path)
                    n = payload[4]
                    off = 5 + n
                    tag = payload[5:off].decode()
                    dtag, redelivered = _DELIVER_TAIL.unpack_from(payload, off)
                    n = payload[off + 9]
                    off += 10
                    exchange = payload[off:off + n].decode("utf-8", "surrogateescape")
                    off += n
                    n = payload[off]
                    off += 1
                    rkey = payload[off:off + n].decode("utf-8", "surrogateescape")
                    self._content = Incoming(tag, dtag, (redelivered & 1) == 1, exchange, rkey)
                    self._content_kind = BASIC_DELIVER
                    return
                if meth == 80 or meth == 120:  # ack / nack of our publishes
                    dtag, flags = _DELIVER_TAIL.unpack_from(payload, 4)
                    self._on_confirm(dtag, bool(flags & 1), meth == 120)
                    return
                if meth == 71:  # get-ok
                    dtag, redelivered = _DELIVER_TAIL.unpack_from(payload, 4)
                    exchange, off = _read_shortstr(payload, 13)
                    rkey, off = _read_shortstr(payload, off)
                    (count,) = _U32.unpack_from(payload, off)
                    self._start_content((60, 71), Incoming("", dtag, bool(redelivered & 1),
                                                           exchange, rkey, message_count=count))
                    return
                if meth == 50:  # return
                    code = _U16.unpack_from(payload, 4)[0]
                    text, off = _read_shortstr(payload, 6)
                    exchange, off = _read_shortstr(payload, off)
                    rkey, off = _read_shortstr(payload, off)
                    self._start_content((60, 50), Incoming("", 0, False, exchange, rkey,
                                                           reply_code=code, reply_text=text))
                    return
                if meth == 30:  # server-sent cancel (the queue went away)
                    tag, _ = _read_shortstr(payload, 4)
                    self.cancelled_by_server.add(tag)
                    return
            if (cls, meth) == CHANNEL_CLOSE:
                code = _U16.unpack_from(payload, 4)[0]
                text, off = _read_shortstr(payload, 6)
                mcls, mmeth = struct.unpack_from(">HH", payload, off)
                self.error = ChannelClosed(code, text, (mcls, mmeth))
                self.is_open = False
                with contextlib.suppress(AMQPError):
                    self.conn.send(self._method_frame(20, 41, b""))
                self.conn._release_channel(self)
                return
            if (cls, meth) == CHANNEL_FLOW:
                active = payload[4] & 1
                with contextlib.suppress(AMQPError):
                    self.conn.send(self._method_frame(20, 21, _bits(bool(active))))
                return
            self._replies.append(((cls, meth), payload, None))

    def _start_content(self, kind: tuple[int, int], msg: Incoming) -> None:
        self._content = msg
        self._content_kind = kind

    def _finish_content(self, body: bytes) -> None:
        msg, kind = self._content, self._content_kind
        assert msg is not None
        msg.body = body
        self._content = None
        if self._body_parts:
            self._body_parts = []
        if kind == BASIC_DELIVER:
            if self.on_delivery is not None:
                self.on_delivery(msg)
            else:
                self.deliveries.append(msg)
        elif kind == BASIC_RETURN:
            self.returned.append(msg)
        else:
            self._replies.append((BASIC_GET_OK, b"", msg))

    def _on_confirm(self, tag: int, multiple: bool, nack: bool) -> None:
        if multiple:
            if nack:
                self.nacked.update(t for t in range(self.confirmed_upto + 1, tag + 1)
                                   if t not in self._settled)
            self.confirmed_upto = max(self.confirmed_upto, tag)
            self._settled = {t for t in self._settled if t > tag}
        else:
            if nack:
                self.nacked.add(tag)
            self._settled.add(tag)
        while self.confirmed_upto + 1 in self._settled:
            self.confirmed_upto += 1
            self._settled.discard(self.confirmed_upto)

    def _on_connection_lost(self) -> None:
        self.is_open = False
        if self.error is None:
            self.error = self.conn._lost_error() if self.conn.error else ConnectionLost(
                "connection closed")

    # -- helpers ---------------------------------------------------------------------------------

    def _method_frame(self, cls: int, meth: int, args: bytes) -> bytes:
        size = 4 + len(args)
        return self._frame_prefix + _U32.pack(size) + _METHOD.pack(cls, meth) + args + b"\xce"

    def check(self) -> None:
        if self.error is not None and not self.is_open:
            raise self.error
        if self.conn.closed:
            raise self.conn._lost_error()

    def wait_until(self, done: Callable[[], bool], timeout: float | None,
                   what: str = "a reply") -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self.check()
            left = 60.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} from {self.conn.params.describe()} in time")
            self.conn.pump(left)
        self.check() if not done() else None

    def _expect(self, methods: Sequence[tuple[int, int]], timeout: float | None = 30.0
                ) -> tuple[tuple[int, int], bytes, Incoming | None]:
        def found() -> bool:
            return any(r[0] in methods for r in self._replies)

        self.wait_until(found, timeout, f"{methods}")
        for i, reply in enumerate(self._replies):
            if reply[0] in methods:
                del self._replies[i]
                return reply
        raise AMQPError("unreachable")  # pragma: no cover

    def call(self, frame: bytes, reply: tuple[int, int] | Sequence[tuple[int, int]],
             timeout: float | None = 30.0) -> tuple[tuple[int, int], bytes, Incoming | None]:
        self.check()
        self.conn.send(frame)
        methods: list[tuple[int, int]] = (
            [reply] if isinstance(reply[0], int) else list(reply))  # type: ignore[list-item, arg-type]
        return self._expect(methods, timeout)

    def drop_replies(self, method: tuple[int, int]) -> None:
        """Forget replies to pipelined calls whose answers are not needed."""
        self._replies = deque(r for r in self._replies if r[0] != method)

    # -- channel ---------------------------------------------------------------------------------

    def _open(self) -> None:
        self.conn.send(self._method_frame(20, 10, _shortstr("")))
        self._expect([CHANNEL_OPEN_OK])
        self.is_open = True

    def close(self) -> None:
        if not self.is_open or self.conn.closed:
            self.conn._release_channel(self)
            return
        try:
            self.is_open = False
            self.conn.send(self._method_frame(20, 40, _U16.pack(200) + _shortstr("bye")
                                              + b"\x00\x00\x00\x00"))
            self.error = None
            self._expect([CHANNEL_CLOSE_OK], timeout=5)
        except (AMQPError, TimeoutError):
            pass
        finally:
            self.conn._release_channel(self)

    # -- frames out (pipelining: build frames, send them together) -------------------------------

    def f_exchange_declare(self, name: str, kind: str = "direct", durable: bool = True,
                           auto_delete: bool = False, passive: bool = False,
                           arguments: dict[str, Any] | None = None, nowait: bool = False
                           ) -> bytes:
        return self._method_frame(40, 10, b"\x00\x00" + _shortstr(name) + _shortstr(kind)
                                  + _bits(passive, durable, auto_delete, False, nowait)
                                  + _table_arg(arguments))

    def f_queue_declare(self, name: str, durable: bool = True, exclusive: bool = False,
                        auto_delete: bool = False, passive: bool = False,
                        arguments: dict[str, Any] | None = None, nowait: bool = False) -> bytes:
        return self._method_frame(50, 10, b"\x00\x00" + _shortstr(name)
                                  + _bits(passive, durable, exclusive, auto_delete, nowait)
                                  + _table_arg(arguments))

    def f_queue_bind(self, queue: str, exchange: str, routing_key: str = "",
                     arguments: dict[str, Any] | None = None, nowait: bool = False) -> bytes:
        return self._method_frame(50, 20, b"\x00\x00" + _shortstr(queue) + _shortstr(exchange)
                                  + _shortstr(routing_key) + _bits(nowait)
                                  + _table_arg(arguments))

    def f_qos(self, prefetch_count: int, global_: bool = False) -> bytes:
        return self._method_frame(60, 10, _U32.pack(0) + _U16.pack(prefetch_count)
                                  + _bits(global_))

    def f_consume(self, queue: str, tag: str, no_ack: bool = False, exclusive: bool = False,
                  nowait: bool = False, arguments: dict[str, Any] | None = None) -> bytes:
        return self._method_frame(60, 20, b"\x00\x00" + _shortstr(queue) + _shortstr(tag)
                                  + _bits(False, no_ack, exclusive, nowait)
                                  + _table_arg(arguments))

    def f_cancel(self, tag: str, nowait: bool = False) -> bytes:
        return self._method_frame(60, 30, _shortstr(tag) + _bits(nowait))

    def f_ack(self, delivery_tag: int, multiple: bool = False) -> bytes:
        return self._method_frame(60, 80, _U64.pack(delivery_tag) + _bits(multiple))

    def f_nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> bytes:
        return self._method_frame(60, 120, _U64.pack(delivery_tag) + _bits(multiple, requeue))

    def f_reject(self, delivery_tag: int, requeue: bool) -> bytes:
        return self._method_frame(60, 90, _U64.pack(delivery_tag) + _bits(requeue))

    def f_get(self, queue: str, no_ack: bool = False) -> bytes:
        return self._method_frame(60, 70, b"\x00\x00" + _shortstr(queue) + _bits(no_ack))

    def f_publish(self, exchange: str, routing_key: str, body: bytes,
                  properties: dict[str, Any] | bytes, mandatory: bool = False) -> bytes:
        """A publish as frames; counts it for confirms (send the frames in this order)."""
        cid = self.id
        args = b"\x00\x00" + _shortstr(exchange) + _shortstr(routing_key) + _bits(mandatory, False)
        method = (_FRAME_HEAD.pack(FRAME_METHOD, cid, 4 + len(args)) + b"\x00\x3c\x00\x28"
                  + args + b"\xce")
        props = properties if isinstance(properties, bytes) else encode_properties(properties)
        header_payload = _CONTENT_HEAD.pack(60, 0, len(body), 0)[:12] + props
        header = _FRAME_HEAD.pack(FRAME_HEADER, cid, len(header_payload)) + header_payload + b"\xce"
        parts = [method, header]
        limit = self.conn.frame_max - 8
        if len(body) <= limit:
            if body:
                parts.append(_FRAME_HEAD.pack(FRAME_BODY, cid, len(body)) + body + b"\xce")
        else:
            for start in range(0, len(body), limit):
                chunk = body[start:start + limit]
                parts.append(_FRAME_HEAD.pack(FRAME_BODY, cid, len(chunk)) + chunk + b"\xce")
        if self.confirming:
            self.publish_seq += 1
        return b"".join(parts)

    # -- calls -----------------------------------------------------------------------------------

    def exchange_declare(self, name: str, kind: str = "direct", durable: bool = True,
                         auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                         passive: bool = False) -> None:
        self.call(self.f_exchange_declare(name, kind, durable, auto_delete, passive, arguments),
                  EXCHANGE_DECLARE_OK)

    def queue_declare(self, name: str, durable: bool = True, exclusive: bool = False,
                      auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                      passive: bool = False) -> tuple[str, int, int]:
        _m, payload, _ = self.call(
            self.f_queue_declare(name, durable, exclusive, auto_delete, passive, arguments),
            QUEUE_DECLARE_OK)
        qname, off = _read_shortstr(payload, 4)
        count, consumers = struct.unpack_from(">II", payload, off)
        return qname, count, consumers

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "",
                   arguments: dict[str, Any] | None = None) -> None:
        self.call(self.f_queue_bind(queue, exchange, routing_key, arguments), QUEUE_BIND_OK)

    def queue_purge(self, queue: str) -> int:
        _m, payload, _ = self.call(self._method_frame(50, 30, b"\x00\x00" + _shortstr(queue)
                                                      + _bits(False)), QUEUE_PURGE_OK)
        return int(_U32.unpack_from(payload, 4)[0])

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False) -> int:
        _m, payload, _ = self.call(self._method_frame(50, 40, b"\x00\x00" + _shortstr(queue)
                                                      + _bits(if_unused, if_empty, False)),
                                   QUEUE_DELETE_OK)
        return int(_U32.unpack_from(payload, 4)[0])

    def exchange_delete(self, name: str) -> None:
        self.call(self._method_frame(40, 20, b"\x00\x00" + _shortstr(name) + _bits(False, False)),
                  EXCHANGE_DELETE_OK)

    def qos(self, prefetch_count: int, global_: bool = False) -> None:
        self.call(self.f_qos(prefetch_count, global_), BASIC_QOS_OK)

    def confirm_select(self) -> None:
        self.call(self._method_frame(85, 10, _bits(False)), CONFIRM_SELECT_OK)
        self.confirming = True

    def consume(self, queue: str, tag: str, no_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None) -> None:
        self.call(self.f_consume(queue, tag, no_ack, exclusive, False, arguments),
                  BASIC_CONSUME_OK)

    def cancel(self, tag: str) -> None:
        self.call(self.f_cancel(tag), BASIC_CANCEL_OK)

    def get(self, queue: str, no_ack: bool = False) -> Incoming | None:
        _m, _p, msg = self.call(self.f_get(queue, no_ack), [BASIC_GET_OK, BASIC_GET_EMPTY])
        return msg

    def publish_confirmed(self, frames: Iterable[bytes], count: int,
                          timeout: float | None = 30.0) -> None:
        """Send ``count`` publishes (their frames) and wait until the server confirmed all.

        Raises PublishNacked or Unroutable (mandatory publishes) for this batch.
        """
        assert self.confirming
        self.check()
        first = self.publish_seq - count + 1
        last = self.publish_seq
        self.returned.clear()
        self.conn.send(b"".join(frames))
        self.wait_until(lambda: self.confirmed_upto >= last, timeout, "publisher confirm")
        nacked = [t for t in self.nacked if first <= t <= last]
        self.nacked.difference_update(range(first, last + 1))
        if self.returned:
            ret = self.returned[0]
            self.returned.clear()
            raise Unroutable(ret.reply_code, ret.reply_text, ret.exchange, ret.routing_key)
        if nacked:
            raise PublishNacked(f"the server refused {len(nacked)} of {count} messages")


def connect_any(params_list: Sequence[Params], start: int = 0) -> tuple[Connection, int]:
    """Connect to the first reachable address, trying each once from ``start``."""
    errors = []
    n = len(params_list)
    for i in range(n):
        index = (start + i) % n
        try:
            return Connection(params_list[index]).connect(), index
        except ConnectionLost as exc:
            errors.append(str(exc))
    raise ConnectionLost("; ".join(errors))
