"""What a worker does with one delivery, from raw message to settled outcome.

decode -> look up -> revoked? expired? due? rate-limited? -> run -> outcome. Bad input
(undecodable, disallowed content, unknown task, too many redeliveries) is dead-lettered
with its reason and, where the message has an id, stored as FAILURE.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.backends.base import TaskMeta
from celeriac.brokers.base import Delivery
from celeriac.exceptions import (
    ContentDisallowed,
    DecodeError,
    NotRegistered,
    TaskRevokedError,
    WorkerLostError,
)
from celeriac.protocol.errors import exception_to_dict
from celeriac.protocol.message import TaskRequest, decode_task
from celeriac.task import Context
from celeriac.trace import Outcome, build_meta, execute, format_traceback
from celeriac.worker.limits import SoftLimit, TokenBucket, parse_rate
from celeriac.worker.slots import ACKS_LATE, REJECT_ON_WORKER_LOST, SlotTable

if TYPE_CHECKING:
    from celeriac.app import Celery

log = logging.getLogger("celeriac.worker")

# What to do with a delivery once handled.
ACK = "ack"
REQUEUE = "requeue"
PARKED = "parked"  # already given back to the broker with a due time


@dataclass(slots=True)
class Settlement:
    action: str
    meta: TaskMeta | None = None
    dead_letter: str | None = None  # reason; the message is kept in the dead-letter store
    park_until: float = 0.0  # with PARKED: the epoch time the message is due


class MessageHandler:
    def __init__(self, app: Celery, hostname: str, revoked: set[str], slots: SlotTable | None,
                 first_slot: int = 0) -> None:
        self.app = app
        self.hostname = hostname
        self.revoked = revoked
        self.slots = slots
        self.slot_index = first_slot
        self.accept = app.accept_content
        conf = app.conf
        self.max_redeliveries = int(conf.task_max_redeliveries)
        self.track_started = bool(conf.task_track_started)
        self.acks_late = bool(conf.task_acks_late)
        self.reject_on_worker_lost = bool(conf.task_reject_on_worker_lost)
        self.acks_on_failure = bool(conf.task_acks_on_failure_or_timeout)
        self.default_time_limit = conf.task_time_limit
        self.default_soft_limit = conf.task_soft_time_limit
        self.rate_limits_enabled = not conf.worker_disable_rate_limits
        self.default_rate = conf.task_default_rate_limit
        self.buckets: dict[str, TokenBucket | None] = {}
        self.soft_limit = SoftLimit()
        self.pid = os.getpid()
        self.rate_divisor = 1
        # Told when a task starts (consumer.started): brokers whose server requeues all a
        # dead connection held (AMQP) ack there what must not run again after a crash.
        self.on_start: Callable[[Delivery, bool, bool], None] | None = None

    # -- failures that never reach the task -------------------------------------------------

    def _reject_bad(self, delivery: Delivery, reason: str, exc: BaseException | None,
                    task_id: str | None, request: Context | None = None) -> Settlement:
        log.error("Dead-lettered message %s from queue %r: %s", task_id or "(no id)",
                  delivery.queue, reason)
        meta = None
        if task_id and exc is not None:
            meta = build_meta(self.app, task_id, states.FAILURE, exception_to_dict(exc), request)
            if request is not None:
                self._abandoned(request, states.FAILURE, exc)
        return Settlement(ACK, meta=meta, dead_letter=reason)

    def _abandoned(self, request: Context, state: str, exc: BaseException) -> None:
        """The task will never run: its chain and chord must not wait for it."""
        if request.chain or (request.chord and request.group):
            try:
                self.app._abandoned(request, state, exc)
            except Exception:
                log.exception("Could not fail what waits on %s", request.id)

    def _revoked(self, req: TaskRequest, why: str, context: Context) -> Settlement:
        log.info("Discarding revoked task: %s[%s] (%s)", req.name, req.id, why)
        exc = TaskRevokedError(why)
        meta = build_meta(self.app, req.id, states.REVOKED, exception_to_dict(exc), context)
        self._abandoned(context, states.REVOKED, exc)
        return Settlement(ACK, meta=meta)

    # -- the path of every message -------------------------------------------------------

    def handle(self, delivery: Delivery) -> Settlement:
        message = delivery.message
        try:
            req = decode_task(message, self.accept)
        except (ContentDisallowed, DecodeError) as exc:
            return self._reject_bad(delivery, f"{type(exc).__name__}: {exc}", exc, message.id)
        except Exception as exc:  # a malformed message must never stop the worker
            return self._reject_bad(delivery, f"malformed message: {exc!r}", DecodeError(str(exc)),
                                    message.id)
        context = self._context(req, delivery)
        task = self.app.tasks.get(req.name)
        if task is None:
            return self._reject_bad(
                delivery, f"unknown task {req.name!r} (not registered in this worker)",
                NotRegistered(req.name), req.id, context,
            )
        if req.id in self.revoked:
            return self._revoked(req, "revoked", context)
        expires = req.headers.get("expires")
        now = time.time()
        if expires is not None and _timestamp(expires) <= now:
            return self._revoked(req, "expired", context)
        eta = req.headers.get("eta")
        if eta is not None:
            due = _timestamp(eta)
            if due > now + 0.001:
                return Settlement(PARKED, park_until=due)
        if delivery.delivery_count > self.max_redeliveries + 1:
            reason = (
                f"delivered {delivery.delivery_count} times: the worker died while running it "
                f"each time (max_redeliveries={self.max_redeliveries})"
            )
            return self._reject_bad(delivery, reason, WorkerLostError(reason), req.id, context)
        if self.rate_limits_enabled:
            wait = self._rate_wait(task)
            if wait > 0:
                return Settlement(PARKED, park_until=now + wait)
        return self._run(task, req, context, delivery)

    def _context(self, req: TaskRequest, delivery: Delivery) -> Context:
        headers = req.headers
        return Context(
            id=req.id, task=req.name, args=req.args, kwargs=req.kwargs,
            retries=req.retries, hostname=self.hostname,
            eta=headers.get("eta"), expires=headers.get("expires"),
            root_id=headers.get("root_id") or req.id, parent_id=headers.get("parent_id"),
            group=headers.get("group"), group_index=headers.get("group_index"),
            delivery_info={"exchange": "", "routing_key": delivery.queue,
                           "priority": req.properties.get("priority"),
                           "redelivered": delivery.redelivered},
            called_directly=False, is_eager=False, timelimit=req.timelimit,
            callbacks=req.callbacks, errbacks=req.errbacks, chain=req.chain, chord=req.chord,
            reply_to=req.properties.get("reply_to"),
            correlation_id=req.properties.get("correlation_id") or req.id,
            origin=headers.get("origin"), ignore_result=bool(headers.get("ignore_result")),
            headers=headers, properties=req.properties, stamps=headers.get("stamps"),
            shadow=headers.get("shadow"), deferred_sends=[],
        )

    def _rate_wait(self, task: Any) -> float:
        name = task.name
        if name in self.buckets:
            bucket = self.buckets[name]
        else:
            rate = parse_rate(task.rate_limit or self.default_rate)
            # Each child limits its share, so the worker as a whole keeps the task's rate.
            bucket = TokenBucket(rate / self.rate_divisor) if rate else None
            self.buckets[name] = bucket
        return bucket.take() if bucket is not None else 0.0

    def _run(self, task: Any, req: TaskRequest, context: Context, delivery: Delivery) -> Settlement:
        acks_late = self.acks_late if task.acks_late is None else task.acks_late
        reject_lost = (self.reject_on_worker_lost if task.reject_on_worker_lost is None
                       else task.reject_on_worker_lost)
        hard, soft = req.timelimit
        hard = hard if hard is not None else (task.time_limit or self.default_time_limit)
        soft = soft if soft is not None else (task.soft_time_limit or self.default_soft_limit)
        slots, index = self.slots, self.slot_index
        if slots is not None:
            flags = (ACKS_LATE if acks_late else 0) | (REJECT_ON_WORKER_LOST if reject_lost else 0)
            slots.start(index, req.id, delivery.tag, req.name, flags, hard)
        if self.on_start is not None:
            # With a hard time limit, an early ack goes at once: the supervisor may kill
            # the child before its flusher ran (a task holding the GIL starves it).
            self.on_start(delivery, acks_late, hard is not None)
        track = self.track_started if task.track_started is None else task.track_started
        if track:
            self.app.backend.store([build_meta(
                self.app, req.id, states.STARTED, {"pid": self.pid, "hostname": self.hostname},
                context,
            )])
        self.soft_limit.arm(soft)
        try:
            outcome = execute(self.app, task, context,
                              after_run=lambda: self.soft_limit.disarm(soft))
        finally:
            self.soft_limit.disarm(soft)
            if slots is not None:
                slots.clear(index)
        if context.deferred_sends:
            outcome = self._send_deferred(req, context, outcome)
        state = outcome.state
        if state == states.SUCCESS:
            log.info("Task %s[%s] succeeded in %.6fs: %r", req.name, req.id, outcome.runtime,
                     outcome.retval)
        elif state == states.FAILURE:
            log.error("Task %s[%s] raised unexpected: %r", req.name, req.id, outcome.exc,
                      exc_info=outcome.exc if outcome.traceback else None)
        elif state == states.RETRY:
            log.info("Task %s[%s] retry: %s", req.name, req.id, outcome.exc)
        elif state == states.REJECTED:
            log.warning("Task %s[%s] rejected: %s", req.name, req.id, outcome.reason)
        if not outcome.ack:
            if outcome.requeue:
                return Settlement(REQUEUE, meta=outcome.meta)
            return Settlement(ACK, meta=outcome.meta, dead_letter=outcome.reason)
        if state == states.FAILURE and acks_late and not self.acks_on_failure:
            return Settlement(ACK, meta=outcome.meta,
                              dead_letter=f"task failed: {outcome.exc!r} (acks_on_failure off)")
        return Settlement(ACK, meta=outcome.meta)

    def _send_deferred(self, req: TaskRequest, context: Context, outcome: Outcome) -> Outcome:
        """Send the retries the task asked for, after storing its RETRY state.

        Stored first (not with the batch) because the next attempt may run at once on
        another child: its result must not be overwritten by this run's RETRY.
        """
        try:
            if outcome.state == states.RETRY and outcome.meta is not None:
                self.app.backend.store([outcome.meta])
                outcome.meta = None
            for send in context.deferred_sends or ():
                send()
        except Exception as exc:
            log.exception("Could not send the retry of %s[%s]", req.name, req.id)
            meta = build_meta(self.app, req.id, states.FAILURE, exception_to_dict(exc), context,
                              format_traceback(exc))
            return Outcome(states.FAILURE, exc=exc, traceback=format_traceback(exc), meta=meta)
        return outcome


def _timestamp(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    dt = datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
