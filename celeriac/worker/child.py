"""A worker child: consumes from the broker on its own and runs tasks.

One readable loop: fetch a batch sized to free slots -> handle each delivery -> store the
batch's results -> ack the batch. Results are stored before acks, so a crash between the
two re-runs a task rather than losing its result.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from celeriac.backends.base import TaskMeta
from celeriac.brokers.base import Consumer, Delivery
from celeriac.control import REVOKE_CHANNEL
from celeriac.worker.handler import ACK, PARKED, REQUEUE, MessageHandler, Settlement
from celeriac.worker.slots import SlotTable

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from celeriac.app import Celery

log = logging.getLogger("celeriac.worker")

# Results of a batch are stored (and its messages acked) together, but not behind a task
# that takes a while: once the next task of the batch has run this long (seconds), a
# helper thread stores the results of those already run, so none is held hostage.
FLUSH_AFTER = 0.02
FLUSHER_IDLE_AFTER = 1.0  # seconds without a batch before the flusher sleeps until notified
# Nor are the batch's messages not yet started: once the task running has taken
# ChildConfig.release_after seconds (worker_prefetch_release_after), they go back to the
# queue, where an idle child or worker takes them (Celery's -Ofair, without a supervisor
# handing out tasks).


@dataclass
class ChildConfig:
    queues: list[str]
    hostname: str
    consumer_id: str
    pool: str = "prefork"  # prefork | threads | solo
    threads: int = 1
    prefetch_multiplier: int = 4
    release_after: float = 0.1  # 0: never give prefetched messages back
    max_tasks: int | None = None
    max_memory_kib: int | None = None
    first_slot: int = 0
    rate_divisor: int = 1
    heartbeat_interval: float = 2.0
    # Solo: no supervisor, so a thread of this process heartbeats and recovers dead consumers.
    maintenance: bool = False
    recovery_timeout: float = 30.0


class ChildWorker:
    def __init__(self, app: Celery, config: ChildConfig, slots: SlotTable | None) -> None:
        self.app = app
        self.config = config
        self.slots = slots
        self.stopping = False
        self.revoked: set[str] = set()
        self.tasks_done = 0
        self._consumer: Consumer | None = None
        self._done: list[tuple[Delivery, Settlement]] = []
        self._done_lock = threading.Lock()
        # Fetched, not started yet (inline pools); the loop and the flusher take from it.
        self._queued: deque[Delivery] = deque()
        self._started_at: float | None = None  # when the task running now started
        self._inflight = 0
        self._revocations: Any = None
        self._revocations_lock = threading.Lock()
        self._revocations_polled = 0.0
        # Serialises settling (store, ack) between the loop and the flusher thread.
        self._settle_lock = threading.Lock()
        self._flush_cond = threading.Condition()
        self._flush_at: float | None = None  # when the flusher should flush, if armed
        self._flusher_stop = False
        self._flusher: threading.Thread | None = None
        self._flusher_idle = False  # waiting with no deadline: arming must wake it
        self._armed_at = 0.0  # monotonic time the flusher was last armed

    # -- signals -------------------------------------------------------------------------

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        """Warm stop: finish what is running, give back what was prefetched."""
        self.stopping = True
        if self._consumer is not None:
            self._consumer.wake()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        app, cfg = self.app, self.config
        broker, backend = app.broker, app.backend
        app.finalize()
        handler = MessageHandler(app, cfg.hostname, self.revoked, self.slots, cfg.first_slot)
        handler.rate_divisor = cfg.rate_divisor
        consumer = self._consumer = broker.consumer(cfg.queues, cfg.consumer_id)
        handler.on_start = consumer.started
        revocations = self._revocations = broker.subscribe(REVOKE_CHANNEL)
        pool = None
        if cfg.pool == "threads":
            # Imported here: the prefork children (and the supervisor they fork from) never
            # need it, and every module loaded before the fork is paid for in each RSS.
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(cfg.threads, "celeriac-task")
        capacity = cfg.threads if pool is not None else 1
        stop_maintenance = threading.Event()
        if cfg.maintenance:
            threading.Thread(target=self._maintain, args=(consumer, stop_maintenance),
                             name="celeriac-heartbeat", daemon=True).start()
        try:
            while not self.stopping:
                free = capacity - self._inflight
                if free <= 0:
                    # Every thread is busy: wait for one to finish (it wakes the consumer).
                    consumer.fetch(0, cfg.heartbeat_interval)
                    self._refresh_revocations(force=True)
                    self._flush(consumer, backend)
                    continue
                batch = consumer.fetch(free * cfg.prefetch_multiplier, cfg.heartbeat_interval)
                # Read revocations after the fetch, not before: a fetch may block until a
                # delayed message is due, and a revoke sent meanwhile must be seen.
                self._refresh_revocations(force=bool(batch))
                if pool is None:
                    self._run_inline(batch, handler, consumer, backend)
                else:
                    self._run_threaded(batch, handler, consumer, pool)
                    self._flush(consumer, backend)
                if self._limits_reached():
                    break
        finally:
            stop_maintenance.set()
            self._stop_flusher()
            if pool is not None:
                pool.shutdown(wait=True)
            self._flush(consumer, backend)
            revocations.close()
            consumer.close()
        return 0

    def _maintain(self, consumer: Consumer, stop: threading.Event) -> None:
        # A thread, not the loop: a long task must not stop this consumer's heartbeat, or
        # another worker would take its messages back while it is still running them.
        broker, cfg = self.app.broker, self.config
        while not stop.wait(cfg.heartbeat_interval):
            try:
                broker.heartbeat([consumer.consumer_id])
                broker.recover_stale(cfg.recovery_timeout)
            except Exception:
                log.exception("heartbeat failed")

    def _run_inline(self, batch: list[Delivery], handler: MessageHandler, consumer: Consumer,
                    backend: Any) -> None:
        # Tasks run on this thread and the flusher watches them: in a batch, an early ack
        # may wait for the batch's acks (one frame), or for the flusher if its task takes
        # a while. A lone task's goes at its start: one frame either way, and then the
        # early ack keeps Celery's exact meaning.
        consumer.defer_started = len(batch) > 1
        with self._done_lock:
            self._queued.extend(batch)
        first = True
        while self._queued:
            # Checked outside the lock (the memory limit reads /proc); the flusher only
            # ever empties the queue, which the pop below sees.
            stop = self.stopping or self._limits_reached()
            with self._done_lock:
                if not self._queued:
                    break
                if stop:
                    rest = list(self._queued)
                    self._queued.clear()
                else:
                    delivery = self._queued.popleft()
                    rest = []
            if rest:
                with self._settle_lock:
                    consumer.reject(rest, requeue=True)
                break
            if not first:
                # A prefetched message may have been revoked while earlier ones ran.
                self._refresh_revocations()
            first = False
            # Should this task take a while, the results before it are stored anyway, and
            # the messages after it go back to the queue (_release_if_slow).
            self._arm_flusher(consumer, backend)
            self._started_at = time.monotonic()
            settlement = self._handle(handler, delivery)
            self._started_at = None
            with self._done_lock:
                self._done.append((delivery, settlement))
            self.tasks_done += 1
        # Results now; the acks ride with the next fetch (one round trip fewer per batch).
        self._flush(consumer, backend, soon=True)

    def _run_threaded(self, batch: list[Delivery], handler: MessageHandler, consumer: Consumer,
                      pool: ThreadPoolExecutor) -> None:
        def work(delivery: Delivery) -> None:
            self._refresh_revocations()  # it may have waited in the pool's queue
            settlement = self._handle(handler, delivery)
            with self._done_lock:
                self._done.append((delivery, settlement))
                self._inflight -= 1
                self.tasks_done += 1
            consumer.wake()

        for delivery in batch:
            with self._done_lock:
                self._inflight += 1
            pool.submit(work, delivery)

    def _handle(self, handler: MessageHandler, delivery: Delivery) -> Settlement:
        try:
            return handler.handle(delivery)
        except BaseException as exc:  # the loop survives anything a message does
            log.exception("Internal error handling message %s", delivery.message.id)
            return Settlement(REQUEUE if isinstance(exc, KeyboardInterrupt) else ACK,
                              dead_letter=f"internal worker error: {exc!r}")

    def _arm_flusher(self, consumer: Consumer, backend: Any) -> None:
        with self._flush_cond:
            if self._flush_at is not None:
                # Armed for later (the prefetch release): an early ack left for the
                # flusher must not wait past FLUSH_AFTER.
                if consumer.defer_started:
                    soon = time.monotonic() + FLUSH_AFTER
                    if self._flush_at > soon:
                        self._flush_at = soon
                        self._flush_cond.notify()
                return
            if not (self._done or self._queued or consumer.defer_started):
                return
            self._armed_at = now = time.monotonic()
            self._flush_at = now + FLUSH_AFTER
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._run_flusher, args=(consumer, backend),
                    name="celeriac-flush", daemon=True,
                )
                self._flusher.start()
            elif self._flusher_idle:
                # (In a timed wait it finds the new deadline when it wakes: no switch to
                # it per batch while batches keep coming.)
                self._flush_cond.notify()

    def _run_flusher(self, consumer: Consumer, backend: Any) -> None:
        """Flush what a batch has done when the task now running takes a while."""
        cond = self._flush_cond
        while True:
            with cond:
                while not self._flusher_stop:
                    due = self._flush_at
                    now = time.monotonic()
                    if due is not None and due <= now:
                        break
                    if due is not None:
                        cond.wait(due - now)
                    elif now - self._armed_at < FLUSHER_IDLE_AFTER:
                        # Batches keep coming: look again soon rather than be notified
                        # per batch (a notify that wakes this thread costs the loop more).
                        cond.wait(FLUSH_AFTER)
                    else:
                        self._flusher_idle = True
                        cond.wait()
                        self._flusher_idle = False
                if self._flusher_stop:
                    return
            try:
                with self._settle_lock:
                    consumer.ack_started()  # the running task's early ack, if left for later
            except Exception:
                log.exception("Could not send early acks")
            try:
                self._flush(consumer, backend)
                self._release_if_slow(consumer)
            except Exception:  # the loop flushes again after the task; it will report
                log.exception("Background flush failed")

    def _release_if_slow(self, consumer: Consumer) -> None:
        """Give back the batch's unstarted messages, and what the consumer read ahead,
        once the task running takes a while."""
        started, after = self._started_at, self.config.release_after
        if started is None or after <= 0:
            return
        wait = started + after - time.monotonic()
        if wait > 0:  # not yet: look again then
            with self._flush_cond:
                if self._flush_at is None:
                    self._flush_at = time.monotonic() + wait
            return
        # The settle lock first, and held while rejecting: the loop cannot get past its
        # _flush() to the next fetch meanwhile (one thread on the consumer at a time).
        with self._settle_lock:
            if self._started_at != started:
                return  # that task ended meanwhile: the loop may be fetching now
            with self._done_lock:
                rest = list(self._queued)
                self._queued.clear()
            if rest:
                consumer.reject(rest, requeue=True)
            # And what the consumer read ahead of the batch (AMQP: up to 40 ms' worth of
            # short tasks), not handed out yet.
            count = len(rest) + consumer.give_back_read_ahead()
            if count:
                log.debug("Gave back %d prefetched message(s) while a task runs long", count)

    def _stop_flusher(self) -> None:
        with self._flush_cond:
            self._flusher_stop = True
            self._flush_cond.notify()
        if self._flusher is not None:
            self._flusher.join()

    def _flush(self, consumer: Consumer, backend: Any, soon: bool = False) -> None:
        with self._settle_lock:
            with self._flush_cond:
                self._flush_at = None
            self._flush_locked(consumer, backend, soon)

    def _flush_locked(self, consumer: Consumer, backend: Any, soon: bool = False) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        if not done:
            return
        metas: list[TaskMeta] = []
        acks: list[Delivery] = []
        requeues: list[Delivery] = []
        broker = self.app.broker
        for delivery, settlement in done:
            if settlement.meta is not None:
                metas.append(settlement.meta)
            if settlement.dead_letter is not None:
                broker.dead_letter(delivery.message, delivery.queue, settlement.dead_letter)
            if settlement.action == ACK:
                acks.append(delivery)
            elif settlement.action == REQUEUE:
                requeues.append(delivery)
            elif settlement.action == PARKED:
                consumer.park(delivery, settlement.park_until)
        if soon and not requeues:
            # The results go out now; the consumer reads their reply during its next
            # fetch's round trip (the two overlap) and acks after the results are stored.
            finish = backend.store_soon(metas) if metas else None
            if finish is not None:
                consumer.ack_after(finish, acks)
            elif acks:
                consumer.ack_soon(acks)
            return
        if metas:
            backend.store(metas)
        if acks:
            consumer.ack(acks)
        if requeues:
            consumer.reject(requeues, requeue=True)

    def _refresh_revocations(self, force: bool = False) -> None:
        """Read new revocations: always when ``force``, else at most every 50 ms."""
        now = time.monotonic()
        if self._revocations is None or (not force and now - self._revocations_polled < 0.05):
            return
        with self._revocations_lock:
            self._revocations_polled = now
            self._absorb_revocations(self._revocations.poll())

    def _absorb_revocations(self, found: Sequence[dict[str, Any]]) -> None:
        for item in found:
            self.revoked.update(item.get("ids") or ())

    def _limits_reached(self) -> bool:
        cfg = self.config
        if cfg.max_tasks is not None and self.tasks_done >= cfg.max_tasks:
            log.info("Child %s reached max_tasks_per_child=%s; exiting to be replaced",
                     os.getpid(), cfg.max_tasks)
            return True
        if cfg.max_memory_kib is not None and self.tasks_done:
            import psutil

            rss_kib = psutil.Process().memory_info().rss // 1024
            if rss_kib > cfg.max_memory_kib:
                log.info("Child %s uses %s KiB > max_memory_per_child=%s; exiting to be replaced",
                         os.getpid(), rss_kib, cfg.max_memory_kib)
                return True
        return False
