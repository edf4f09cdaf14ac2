"""Cross-process wake-ups for the embedded SQLite store.

SQLite cannot tell a reader that a row arrived, and polling costs either latency or CPU.
Each waiting process binds a Unix datagram socket in a directory named after the database
and topic; a writer sends one byte to every socket there after it commits. A waiter
``select``s on its socket, so it wakes within microseconds and sleeps at no cost.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
import time
import uuid

# A directory's mtime may advance in coarse ticks (a jiffy, or worse on some filesystems),
# so a listing taken less than this long after the mtime may have missed a later change
# stamped with the same mtime.
_RACY_NS = 100_000_000

try:
    # CPython's own SHA-1 gives the same digest as hashlib's without loading OpenSSL's
    # libcrypto, which adds ~3.5 MB to the RSS of the supervisor and of every forked child.
    from _sha1 import sha1 as _sha1  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - a build without it
    from hashlib import sha1 as _sha1


def _temp_dir() -> str:
    """The directory ``tempfile.gettempdir()`` gives, found without importing tempfile.

    tempfile pulls in shutil, bz2 and lzma (~0.4 MB in the RSS of the supervisor and of each
    forked child). Same candidates in the same order; a ``tempfile.tempdir`` set by the
    program is honoured.
    """
    loaded = sys.modules.get("tempfile")
    if loaded is not None and loaded.tempdir is not None:
        return str(loaded.tempdir)
    names = [os.environ.get(name) for name in ("TMPDIR", "TEMP", "TMP")]
    for directory in [*names, "/tmp", "/var/tmp", "/usr/tmp"]:
        if directory and os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
            return os.path.abspath(directory)
    import tempfile

    return tempfile.gettempdir()


def channel_dir(db_path: str, topic: str) -> str:
    digest = _sha1(os.path.realpath(db_path).encode()).hexdigest()[:16]
    # Socket paths are limited to ~108 bytes, so they live under the temp dir, not beside the db.
    # Created by the first listener, removed by the last (Listener.close).
    return os.path.join(_temp_dir(), f"celeriac-{digest}", topic)


def _remove_socket(path: str) -> None:
    """Unlink a listener's socket; the last one leaves no empty directories behind.

    rmdir fails while another listener's socket is there, which is what we want; a listener
    binding just as its directory goes re-creates it (Listener.__init__).
    """
    try:
        os.unlink(path)
        directory = os.path.dirname(path)
        os.rmdir(directory)
        os.rmdir(os.path.dirname(directory))
    except OSError:
        pass


class Listener:
    """A socket that receives wake-ups for one topic."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for attempt in range(100):
            try:
                self.sock.bind(self.path)
                break
            except FileNotFoundError:
                # First listener, or the last one is removing the empty directories right
                # now (_remove_socket): make them (again) and retry.
                if attempt == 99:
                    raise
                try:
                    os.makedirs(directory, exist_ok=True)
                except FileNotFoundError:
                    pass
        self.sock.setblocking(False)
        # poll, not select: select fails on descriptors past FD_SETSIZE (1024), which a
        # busy process reaches, and a failing wait would turn its fetch loop into a spin.
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a wake-up; drain pending ones. True if woken."""
        try:
            ready = self._poll.poll(max(0.0, timeout) * 1000.0)
        except (OSError, ValueError):
            return False
        if ready:
            self.drain()
            return True
        return False

    def drain(self) -> None:
        try:
            while True:
                self.sock.recv(64)
        except (BlockingIOError, OSError):
            pass

    def wake(self) -> None:
        """Wake this listener (from a signal handler or another thread)."""
        try:
            self.sock.sendto(b"!", self.path)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            _remove_socket(self.path)


class Notifier:
    """Sends wake-ups to every listener of a topic."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._targets: list[str] = []
        self._mtime_ns = -1
        self._racy = True
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except FileNotFoundError:  # no listener yet (or any more): nobody to wake
            self._targets, self._mtime_ns, self._racy = [], -1, True
            return
        if mtime != self._mtime_ns or self._racy:
            # A listener bound just after the last listing, within the same mtime tick,
            # leaves the mtime unchanged: re-list until the listing is safely newer.
            self._racy = time.time_ns() - mtime < _RACY_NS
            self._mtime_ns = mtime
            try:
                names = os.listdir(self.directory)
            except FileNotFoundError:  # removed by its last listener: nobody to wake
                names = []
            self._targets = [os.path.join(self.directory, n) for n in names]

    def notify(self) -> None:
        with self._lock:
            self._refresh()
            for target in self._targets:
                try:
                    self._sock.sendto(b".", target)
                except BlockingIOError:
                    pass  # its buffer is full of wake-ups already
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                        # The listener's process died without unlinking its socket.
                        _remove_socket(target)

    def close(self) -> None:
        self._sock.close()
