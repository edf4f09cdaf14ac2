"""The supervisor: forks the children and only supervises them.

It never sees a message. It restarts a child that dies (recovering what that child held),
kills a child whose task passed its hard time limit, keeps the children's broker
heartbeats fresh, recovers consumers of dead workers, and turns signals into warm
(first TERM/INT: finish running tasks, give back prefetched ones) or cold (second
TERM/INT, or QUIT: kill the children now) shutdown.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.control import REVOKE_CHANNEL
from celeriac.exceptions import (
    ImproperlyConfigured,
    TaskRevokedError,
    TimeLimitExceeded,
    WorkerLostError,
)
from celeriac.protocol.errors import exception_to_dict
from celeriac.trace import build_meta
from celeriac.worker.child import ChildConfig, ChildWorker
from celeriac.worker.slots import SlotTable

if TYPE_CHECKING:
    from celeriac.app import Celery

log = logging.getLogger("celeriac.worker")

MAINTENANCE_EVERY = 5.0  # seconds between checks for dead workers' consumers
CLEANUP_EVERY = 3600.0  # seconds between expired-result sweeps
# Longest sleep of the supervision loop, which also reads revoke(terminate=True) requests:
# so a terminate takes effect within this long. (Hard limits wake it at once: slots.py.)
MAX_SLEEP = 0.5


@dataclass
class WorkerOptions:
    concurrency: int
    queues: list[str]
    hostname: str
    pool: str = "prefork"
    prefetch_multiplier: int = 4
    prefetch_release_after: float = 0.1
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    heartbeat_interval: float = 2.0
    recovery_timeout: float = 30.0
    shutdown_timeout: float | None = None

    @classmethod
    def from_app(cls, app: Celery, **overrides: Any) -> WorkerOptions:
        conf = app.conf
        queues = overrides.pop("queues", None) or app.default_worker_queues()
        if isinstance(queues, str):
            queues = [q.strip() for q in queues.split(",") if q.strip()]
        hostname = overrides.pop("hostname", None) or f"celeriac@{socket.gethostname()}"
        hostname = hostname.replace("%h", socket.gethostname()).replace(
            "%n", socket.gethostname().split(".")[0]
        )
        concurrency = overrides.pop("concurrency", None) or conf.worker_concurrency or (
            os.cpu_count() or 1
        )
        values: dict[str, Any] = {
            "concurrency": int(concurrency),
            "queues": list(queues),
            "hostname": hostname,
            "pool": conf.worker_pool,
            "prefetch_multiplier": conf.worker_prefetch_multiplier,
            "prefetch_release_after": conf.worker_prefetch_release_after,
            "max_tasks_per_child": conf.worker_max_tasks_per_child,
            "max_memory_per_child": conf.worker_max_memory_per_child,
            "heartbeat_interval": conf.worker_heartbeat_interval,
            "recovery_timeout": conf.broker_recovery_timeout,
            "shutdown_timeout": conf.worker_shutdown_timeout,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["recovery_timeout"] < 3 * values["heartbeat_interval"]:
            # Shorter, and a live worker between two heartbeats looks dead to the others.
            raise ImproperlyConfigured(
                f"broker_recovery_timeout={values['recovery_timeout']} must be at least 3 x "
                f"worker_heartbeat_interval={values['heartbeat_interval']}"
            )
        return cls(**values)


@dataclass
class _Child:
    index: int
    pid: int
    consumer_id: str
    started: float = field(default_factory=time.monotonic)
    killed_for: str | None = None  # "timeout" when the supervisor killed it for a hard limit


class Supervisor:
    def __init__(self, app: Celery, options: WorkerOptions) -> None:
        self.app = app
        self.options = options
        self.children: dict[int, _Child] = {}
        self.shutdown: str | None = None  # None, "warm" or "cold"
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        processes = 1 if options.pool in ("threads", "solo") else options.concurrency
        self.processes = processes
        self.slots = SlotTable(processes)
        self.slots.notify_fd = self._wakeup_w.fileno()

    # -- entry point ---------------------------------------------------------------------

    def start(self) -> int:
        opts = self.options
        self.app.finalize()
        # Import-time connection work happens once here, not in every child.
        _ = self.app.accept_content
        # Broadcast names become this worker's own queues; worker_direct adds <hostname>.dq2.
        opts.queues = self.app.worker_queues(opts.queues, opts.hostname)
        log.info("celeriac worker %s: pool=%s concurrency=%s queues=%s broker=%s",
                 opts.hostname, opts.pool, opts.concurrency, ",".join(opts.queues),
                 _safe_url(self.app.broker_url))
        recovered = self.app.broker.recover_stale(opts.recovery_timeout)
        if recovered:
            log.warning("Recovered %s messages held by workers that died", recovered)
        if opts.pool == "solo":
            return self._run_solo()
        self._install_signals()
        for index in range(self.processes):
            self._spawn(index)
        try:
            return self._supervise()
        finally:
            signal.set_wakeup_fd(-1)

    def _run_solo(self) -> int:
        child = ChildWorker(self.app, self._child_config(0, f"{self.options.hostname}:solo:"
                                                         f"{uuid.uuid4().hex[:8]}"), None)
        child.config.maintenance = True
        child.install_signals()
        return child.run()

    def _child_config(self, index: int, consumer_id: str) -> ChildConfig:
        opts = self.options
        threads = opts.concurrency if opts.pool == "threads" else 1
        return ChildConfig(
            queues=opts.queues, hostname=opts.hostname, consumer_id=consumer_id,
            pool=opts.pool, threads=threads, prefetch_multiplier=opts.prefetch_multiplier,
            release_after=opts.prefetch_release_after,
            max_tasks=opts.max_tasks_per_child, max_memory_kib=opts.max_memory_per_child,
            first_slot=index, rate_divisor=self.processes,
            heartbeat_interval=opts.heartbeat_interval,
            recovery_timeout=opts.recovery_timeout,
        )

    # -- children ------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        consumer_id = f"{self.options.hostname}:{index}:{uuid.uuid4().hex[:8]}"
        self.slots.clear(index)
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                _die_with_parent(parent)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGQUIT):
                    signal.signal(sig, signal.SIG_DFL)
                self._wakeup_r.close()  # the write end stays: see SlotTable.notify_fd
                _name_process(f"Worker-{index + 1}")
                child = ChildWorker(self.app, self._child_config(index, consumer_id), self.slots)
                child.install_signals()
                code = child.run()
            except BaseException:
                log.exception("Worker child crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = _Child(index, pid, consumer_id)
        log.debug("Started child %s (pid %s)", index + 1, pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self._recover_child(child, status)
            if self.shutdown is None:
                self._spawn(child.index)

    def _recover_child(self, child: _Child, status: int) -> None:
        """Settle what a dead child held: its running task, then its prefetched messages."""
        slot = self.slots.read(child.index)
        self.slots.clear(child.index)
        broker = self.app.broker
        if os.WIFSIGNALED(status):
            how = f"signal {os.WTERMSIG(status)} ({signal.Signals(os.WTERMSIG(status)).name})"
        else:
            how = f"exit code {os.WEXITSTATUS(status)}"
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if not slot.running:
            if not clean:
                log.error("Child %s (pid %s) exited with %s", child.index + 1, child.pid, how)
            broker.recover(child.consumer_id)
            return
        if child.killed_for == "revoked":
            log.warning("Terminated revoked task %s[%s]", slot.name, slot.task_id)
            self._store_state(slot.task_id, states.REVOKED, TaskRevokedError("terminated"))
            broker.recover(child.consumer_id, slot.tag, requeue_running=False)
        elif child.killed_for == "timeout":
            exc: BaseException = TimeLimitExceeded(slot.hard_limit)
            log.error("Hard time limit (%ss) exceeded for %s[%s]; child killed",
                      slot.hard_limit, slot.name, slot.task_id)
            self._store_state(slot.task_id, states.FAILURE, exc)
            broker.recover(child.consumer_id, slot.tag, requeue_running=False)
        elif slot.acks_late and (slot.reject_on_worker_lost or self.shutdown == "cold"):
            log.error("Child %s (pid %s) died with %s running %s[%s]; the task is requeued",
                      child.index + 1, child.pid, how, slot.name, slot.task_id)
            broker.recover(child.consumer_id, slot.tag, requeue_running=True)
        else:
            exc = WorkerLostError(f"Worker exited prematurely: {how}.")
            log.error("Child %s (pid %s) died with %s running %s[%s]", child.index + 1,
                      child.pid, how, slot.name, slot.task_id)
            self._store_state(slot.task_id, states.FAILURE, exc)
            broker.recover(child.consumer_id, slot.tag, requeue_running=False)

    def _store_state(self, task_id: str, state: str, exc: BaseException) -> None:
        try:
            self.app.backend.store([
                build_meta(self.app, task_id, state, exception_to_dict(exc), None,
                           f"{type(exc).__name__}: {exc}\n")
            ])
        except Exception:
            log.exception("Could not store the failure of %s", task_id)

    # -- the supervision loop ------------------------------------------------------------

    def _supervise(self) -> int:
        opts = self.options
        next_beat = next_maintenance = 0.0
        next_cleanup = time.monotonic() + CLEANUP_EVERY
        warm_deadline: float | None = None
        revocations = self.app.broker.subscribe(REVOKE_CHANNEL)
        while self.children:
            now = time.monotonic()
            if self.shutdown is None:
                if now >= next_beat:
                    next_beat = now + opts.heartbeat_interval
                    # The supervisor beats for its children: a child deep in a long task
                    # is alive, and its messages must not be taken back.
                    self.app.broker.heartbeat([c.consumer_id for c in self.children.values()])
                if now >= next_maintenance:
                    # A dead worker's messages come back within a sixth of the timeout
                    # after it expires.
                    next_maintenance = now + min(MAINTENANCE_EVERY, opts.recovery_timeout / 6)
                    self.app.broker.recover_stale(opts.recovery_timeout)
                if now >= next_cleanup:
                    next_cleanup = now + CLEANUP_EVERY
                    self.app.backend.cleanup()
            elif self.shutdown == "warm" and opts.shutdown_timeout and warm_deadline is None:
                warm_deadline = now + opts.shutdown_timeout
            if warm_deadline is not None and now >= warm_deadline and self.shutdown == "warm":
                log.warning("Warm shutdown took longer than %ss; going cold", opts.shutdown_timeout)
                self._go_cold()
            self._terminate_revoked(revocations.poll())
            wait = self._enforce_time_limits()
            self._wait(min(wait, opts.heartbeat_interval, MAX_SLEEP))
            self._reap()
        log.info("celeriac worker %s stopped", opts.hostname)
        return 0

    def _terminate_revoked(self, found: list[dict[str, Any]]) -> None:
        """``revoke(terminate=True)``: kill the child running a revoked task."""
        ids = {i for item in found if item.get("terminate") for i in item.get("ids") or ()}
        if not ids:
            return
        for child in list(self.children.values()):
            slot = self.slots.read(child.index)
            if slot.running and slot.task_id in ids and not child.killed_for:
                child.killed_for = "revoked"
                _kill(child.pid, signal.SIGKILL)

    def _enforce_time_limits(self) -> float:
        """Kill children past their task's hard limit; seconds until the next deadline."""
        now = time.time()
        soonest = 3600.0
        for child in list(self.children.values()):
            deadline = self.slots.read(child.index).deadline
            if deadline is None or child.killed_for:
                continue
            if deadline <= now:
                child.killed_for = "timeout"
                _kill(child.pid, signal.SIGKILL)
            else:
                soonest = min(soonest, deadline - now)
        return soonest

    def _wait(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._wakeup_r], [], [], max(0.0, timeout))
        except InterruptedError:
            return
        if ready:
            try:
                while self._wakeup_r.recv(512):
                    pass
            except (BlockingIOError, OSError):
                pass

    # -- signals -------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGQUIT, self._on_quit)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        if self.shutdown is None:
            log.info("Warm shutdown (%s): running tasks finish, the rest go back",
                        signal.Signals(signum).name)
            self.shutdown = "warm"
            for child in self.children.values():
                _kill(child.pid, signal.SIGTERM)
        else:
            self._go_cold()

    def _on_quit(self, signum: int, frame: FrameType | None) -> None:
        self._go_cold()

    def _go_cold(self) -> None:
        if self.shutdown == "cold":
            return
        log.warning("Cold shutdown: killing running tasks")
        self.shutdown = "cold"
        for child in self.children.values():
            _kill(child.pid, signal.SIGKILL)


def _name_process(name: str) -> None:
    """Name this process in log records (``%(processName)s``).

    A record factory, not ``multiprocessing.current_process().name``: importing
    multiprocessing only for that costs ~0.35 MB in the supervisor and in every child.
    """
    make_record = logging.getLogRecordFactory()

    def named(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.processName = name
        return record

    logging.setLogRecordFactory(named)


def _die_with_parent(parent: int) -> None:
    """Make the kernel kill this child when the supervisor dies (Linux).

    An orphaned child would go on fetching while its heartbeats stop, so other workers would
    take back and re-run the tasks it still runs.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:**@{host}"
    return url
