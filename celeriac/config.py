"""Settings: Celery's lowercase names and defaults, checked when they are set.

A value of the wrong kind, an unknown serializer or pool, or a misspelt setting name
raises ImproperlyConfigured naming the setting, at configuration time, not in a worker
an hour later.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from importlib import import_module
from types import ModuleType
from typing import Any

from celeriac.exceptions import ImproperlyConfigured

Check = Callable[[str, Any], Any]


def _kind(*kinds: type, none: bool = True) -> Check:
    def check(name: str, value: Any) -> Any:
        if value is None and none:
            return value
        if isinstance(value, bool) and bool not in kinds and (int in kinds or float in kinds):
            raise ImproperlyConfigured(f"{name}={value!r}: expected a number, not a bool")
        if not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ImproperlyConfigured(f"{name}={value!r}: expected {names}")
        return value

    return check


def _number(minimum: float = 0, none: bool = True, integer: bool = False) -> Check:
    def check(name: str, value: Any) -> Any:
        if value is None and none:
            return None
        if isinstance(value, timedelta) and not integer:
            value = value.total_seconds()
        if isinstance(value, str):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise ImproperlyConfigured(f"{name}={value!r}: expected a number") from None
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ImproperlyConfigured(
                f"{name}={value!r}: expected {'an integer' if integer else 'a number'}"
            )
        if value < minimum:
            raise ImproperlyConfigured(f"{name}={value!r}: must be at least {minimum}")
        return value

    return check


def _choice(*choices: Any) -> Check:
    def check(name: str, value: Any) -> Any:
        if value not in choices:
            raise ImproperlyConfigured(f"{name}={value!r}: choose one of {list(choices)}")
        return value

    return check


def _serializer(name: str, value: Any) -> Any:
    from celeriac.protocol import serializers

    serializers.by_name(value, name)
    return value


def _content_list(name: str, value: Any) -> Any:
    from celeriac.protocol import serializers

    if value is None and name == "result_accept_content":
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple | set | frozenset):
        raise ImproperlyConfigured(f"{name}={value!r}: expected a list of serializer names")
    try:
        serializers.accepted_types(value)
    except ImproperlyConfigured as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None
    return list(value)


def _url(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return ";".join(value)
    if not isinstance(value, str):
        raise ImproperlyConfigured(f"{name}={value!r}: expected a URL string")
    return value


def _routes(name: str, value: Any) -> Any:
    if value is None or callable(value) or isinstance(value, dict | list | tuple | str):
        return value
    raise ImproperlyConfigured(f"{name}={value!r}: expected a dict, list, function or None")


def _strings(name: str, value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple | set):
        raise ImproperlyConfigured(f"{name}={value!r}: expected a list of module names")
    return tuple(value)


def _timezone(name: str, value: Any) -> Any:
    if value is None:
        return None
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ImproperlyConfigured(f"{name}={value!r}: unknown time zone") from None
    return str(value)


@dataclass(frozen=True, slots=True)
class Setting:
    default: Any
    check: Check


_bool = _kind(bool, none=False)
_opt_dict = _kind(dict)

SETTINGS: dict[str, Setting] = {
    # top level
    "accept_content": Setting(["json"], _content_list),
    "enable_utc": Setting(True, _bool),
    "timezone": Setting(None, _timezone),
    "imports": Setting((), _strings),
    "include": Setting((), _strings),
    # broker
    "broker_url": Setting(None, _url),
    "broker_transport_options": Setting({}, _kind(dict, none=False)),
    "broker_connection_retry": Setting(True, _bool),
    "broker_connection_retry_on_startup": Setting(True, _bool),
    "broker_connection_max_retries": Setting(100, _number(integer=True)),
    "broker_connection_timeout": Setting(4.0, _number()),
    "broker_heartbeat": Setting(120.0, _number()),
    "broker_recovery_timeout": Setting(30.0, _number(minimum=1, none=False)),
    # results
    "result_backend": Setting(None, _url),
    "result_backend_transport_options": Setting({}, _kind(dict, none=False)),
    "result_serializer": Setting("json", _serializer),
    "result_accept_content": Setting(None, _content_list),
    "result_expires": Setting(86400.0, _number()),
    "result_extended": Setting(False, _bool),
    "result_persistent": Setting(None, _kind(bool)),
    # tasks
    "task_serializer": Setting("json", _serializer),
    "task_protocol": Setting(2, _choice(2)),
    "task_default_queue": Setting("celery", _kind(str, none=False)),
    "task_default_priority": Setting(None, _number(integer=True)),
    "task_default_rate_limit": Setting(None, _kind(str, int, float)),
    "task_acks_late": Setting(False, _bool),
    "task_acks_on_failure_or_timeout": Setting(True, _bool),
    "task_reject_on_worker_lost": Setting(False, _kind(bool)),
    "task_track_started": Setting(False, _bool),
    "task_time_limit": Setting(None, _number()),
    "task_soft_time_limit": Setting(None, _number()),
    "task_ignore_result": Setting(False, _bool),
    "task_store_errors_even_if_ignored": Setting(False, _bool),
    "task_always_eager": Setting(False, _bool),
    "task_eager_propagates": Setting(False, _bool),
    "task_store_eager_result": Setting(False, _bool),
    "task_routes": Setting(None, _routes),
    "task_annotations": Setting(None, _kind(dict, list, tuple)),
    "task_queues": Setting(None, _kind(list, tuple, dict)),
    "task_create_missing_queues": Setting(True, _bool),
    "task_publish_retry": Setting(True, _bool),
    "task_publish_retry_policy": Setting(
        {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        _kind(dict, none=False),
    ),
    "task_remote_tracebacks": Setting(False, _bool),
    "task_max_redeliveries": Setting(5, _number(integer=True, minimum=0, none=False)),
    "task_max_message_size": Setting(64 * 1024 * 1024, _number(integer=True, minimum=1)),
    "task_inherit_parent_priority": Setting(False, _bool),
    # worker
    "worker_concurrency": Setting(None, _number(integer=True, minimum=1)),
    "worker_prefetch_multiplier": Setting(4, _number(integer=True, minimum=1, none=False)),
    "worker_max_tasks_per_child": Setting(None, _number(integer=True, minimum=1)),
    "worker_max_memory_per_child": Setting(None, _number(integer=True, minimum=1)),
    "worker_pool": Setting("prefork", _choice("prefork", "threads", "solo")),
    "worker_disable_rate_limits": Setting(False, _bool),
    "worker_hijack_root_logger": Setting(True, _bool),
    "worker_log_format": Setting(
        "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s", _kind(str, none=False)
    ),
    "worker_task_log_format": Setting(
        "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s",
        _kind(str, none=False),
    ),
    "worker_send_task_events": Setting(False, _bool),
    "worker_lost_wait": Setting(10.0, _number()),
    "worker_revoke_expires": Setting(10800.0, _number(minimum=1, none=False)),
    "worker_heartbeat_interval": Setting(2.0, _number(minimum=0.1, none=False)),
    "worker_shutdown_timeout": Setting(None, _number()),
}

# Celery settings we accept without acting on (yet): a config written for Celery loads.
CELERY_ONLY = frozenset(
    """
    result_cache_max result_compression result_exchange result_exchange_type
    result_chord_ordered result_chord_join_timeout result_chord_retry_interval
    result_backend_always_retry result_backend_max_retries
    result_backend_base_sleep_between_retries_ms result_backend_max_sleep_between_retries_ms
    beat_schedule beat_scheduler beat_schedule_filename beat_sync_every beat_max_loop_interval
    beat_cron_starting_deadline beat_enable_remote_control beat_remote_control_max_tick_age
    broker_read_url broker_write_url broker_transport broker_channel_error_retry
    broker_failover_strategy broker_heartbeat_checkrate broker_login_method broker_pool_limit
    broker_pool_acquire_timeout broker_use_ssl broker_host broker_port broker_user
    broker_password broker_vhost broker_native_delayed_delivery_queue_type
    task_compression task_create_missing_queue_type task_create_missing_queue_exchange_type
    task_default_delivery_mode task_default_queue_type task_default_exchange
    task_default_exchange_type task_default_routing_key task_queue_max_priority
    task_retry_on_worker_lost task_repr_maxlevels task_send_sent_event
    task_allow_error_cb_on_chord_header task_acks_on_failure task_acks_on_timeout
    task_publish_retry_policy
    worker_agent worker_autoscaler worker_cancel_long_running_tasks_on_connection_loss
    worker_soft_shutdown_timeout worker_enable_soft_shutdown_on_idle worker_consumer
    worker_direct worker_deduplicate_successful_tasks worker_enable_remote_control
    worker_log_color worker_log_datefmt worker_pool_putlocks worker_pool_restarts
    worker_pool_start_method worker_proc_alive_timeout worker_eta_task_limit
    worker_enable_prefetch_count_reduction worker_disable_prefetch worker_redirect_stdouts
    worker_redirect_stdouts_level worker_state_db worker_task_log_datefmt worker_timer
    worker_timer_precision worker_detect_quorum_queues
    event_queue_expires event_queue_ttl event_queue_prefix event_queue_exclusive
    event_queue_durable event_serializer event_exchange
    control_queue_ttl control_queue_expires control_queue_exclusive control_queue_durable
    control_exchange security_certificate security_cert_store security_key
    security_key_password security_digest
    """.split()
)

_CHECKED_PREFIXES = ("task_", "worker_", "broker_", "result_", "beat_", "event_", "control_")


def check_setting(name: str, value: Any) -> Any:
    """Validate one setting; returns the normalised value."""
    setting = SETTINGS.get(name)
    if setting is not None:
        return setting.check(name, value)
    if name in CELERY_ONLY or name.startswith("_"):
        return value
    if name.startswith(_CHECKED_PREFIXES) or difflib.get_close_matches(name, SETTINGS, 1, 0.85):
        close = difflib.get_close_matches(name, list(SETTINGS) + sorted(CELERY_ONLY), 1, 0.7)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ImproperlyConfigured(f"unknown setting {name!r}{hint}")
    return value


class Settings(MutableMapping[str, Any]):
    """``app.conf``: a mapping with attribute access; every write is checked."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", {k: s.default for k, s in SETTINGS.items()})
        if values:
            self.update(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._values[key] = check_setting(key, value)

    def __delitem__(self, key: str) -> None:
        if key in SETTINGS:
            self._values[key] = SETTINGS[key].default
        else:
            del self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __repr__(self) -> str:
        return f"<Settings: {len(self)} keys>"

    def table(self) -> dict[str, Any]:
        return dict(self._values)


def read_object(obj: Any, namespace: str | None = None) -> dict[str, Any]:
    """Settings from an object or a dotted path (``"pkg.mod"`` or ``"pkg.mod:attr"``)."""
    if isinstance(obj, str):
        module_name, _, attr = obj.partition(":")
        try:
            target: Any = import_module(module_name)
        except ImportError as exc:
            raise ImproperlyConfigured(f"config_from_object: cannot import {obj!r}: {exc}") from exc
        if attr:
            target = getattr(target, attr)
        obj = target
    items = obj.items() if isinstance(obj, Mapping) else ((k, getattr(obj, k)) for k in dir(obj))
    out: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(key, str):
            continue
        if namespace:
            prefix = namespace.rstrip("_") + "_"
            if not key.startswith(prefix):
                continue
            key = key[len(prefix) :].lower()
        elif key.startswith("_") or key != key.lower() or isinstance(value, ModuleType):
            continue
        out[key] = value
    return out


def read_envvar(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ImproperlyConfigured(f"config_from_envvar: environment variable {name} is not set")
    return value
