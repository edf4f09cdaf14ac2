"""Settings: Celery's lowercase names and defaults, checked when they are set.

A value of the wrong kind, an unknown serializer or pool, or a misspelt setting name
raises ImproperlyConfigured naming the setting, at configuration time, not in a worker
an hour later.
"""

from __future__ import annotations

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
        if isinstance(value, int | float) and value < minimum:
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
    # celeriac's: once a task has run this long (s), its child gives back the messages it
    # prefetched behind it (0: keep them until it gets to them).
    "worker_prefetch_release_after": Setting(0.1, _number(minimum=0, none=False)),
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
    "worker_direct": Setting(False, _bool),
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
    worker_deduplicate_successful_tasks worker_enable_remote_control
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
    """.split()  # noqa: SIM905 - a word list reads better than quoted strings
)

_CHECKED_PREFIXES = ("task_", "worker_", "broker_", "result_", "beat_", "event_", "control_")

# Celery's pre-4.0 upper-case names, which Celery 5 still reads (``BROKER_URL``,
# ``CELERY_ALWAYS_EAGER``, ``CELERYD_CONCURRENCY``…): an old config keeps working.
OLD_NAMES: dict[str, str] = {
    "CELERY_ACCEPT_CONTENT": "accept_content", "RESULT_ACCEPT_CONTENT": "result_accept_content",
    "ENABLE_UTC": "enable_utc", "CELERY_IMPORTS": "imports", "CELERY_INCLUDE": "include",
    "CELERY_TIMEZONE": "timezone",
    "CELERYBEAT_ENABLE_REMOTE_CONTROL": "beat_enable_remote_control",
    "CELERYBEAT_REMOTE_CONTROL_MAX_TICK_AGE": "beat_remote_control_max_tick_age",
    "CELERYBEAT_MAX_LOOP_INTERVAL": "beat_max_loop_interval",
    "CELERYBEAT_SCHEDULE": "beat_schedule", "CELERYBEAT_SCHEDULER": "beat_scheduler",
    "CELERYBEAT_SCHEDULE_FILENAME": "beat_schedule_filename",
    "CELERYBEAT_SYNC_EVERY": "beat_sync_every",
    "CELERYBEAT_CRON_STARTING_DEADLINE": "beat_cron_starting_deadline", "BROKER_URL": "broker_url",
    "BROKER_READ_URL": "broker_read_url", "BROKER_WRITE_URL": "broker_write_url",
    "BROKER_TRANSPORT": "broker_transport", "BROKER_TRANSPORT_OPTIONS": "broker_transport_options",
    "BROKER_CONNECTION_TIMEOUT": "broker_connection_timeout",
    "BROKER_CONNECTION_RETRY": "broker_connection_retry",
    "BROKER_CONNECTION_RETRY_ON_STARTUP": "broker_connection_retry_on_startup",
    "BROKER_CONNECTION_MAX_RETRIES": "broker_connection_max_retries",
    "BROKER_CHANNEL_ERROR_RETRY": "broker_channel_error_retry",
    "BROKER_FAILOVER_STRATEGY": "broker_failover_strategy", "BROKER_HEARTBEAT": "broker_heartbeat",
    "BROKER_HEARTBEAT_CHECKRATE": "broker_heartbeat_checkrate",
    "BROKER_LOGIN_METHOD": "broker_login_method",
    "BROKER_NATIVE_DELAYED_DELIVERY_QUEUE_TYPE": "broker_native_delayed_delivery_queue_type",
    "BROKER_POOL_LIMIT": "broker_pool_limit",
    "BROKER_POOL_ACQUIRE_TIMEOUT": "broker_pool_acquire_timeout",
    "BROKER_USE_SSL": "broker_use_ssl", "BROKER_HOST": "broker_host", "BROKER_PORT": "broker_port",
    "BROKER_USER": "broker_user", "BROKER_PASSWORD": "broker_password",
    "BROKER_VHOST": "broker_vhost", "CONTROL_QUEUE_TTL": "control_queue_ttl",
    "CONTROL_QUEUE_EXPIRES": "control_queue_expires",
    "CONTROL_QUEUE_EXCLUSIVE": "control_queue_exclusive",
    "CONTROL_QUEUE_DURABLE": "control_queue_durable", "CONTROL_EXCHANGE": "control_exchange",
    "CELERY_EVENT_QUEUE_EXPIRES": "event_queue_expires",
    "CELERY_EVENT_QUEUE_TTL": "event_queue_ttl", "CELERY_EVENT_QUEUE_PREFIX": "event_queue_prefix",
    "CELERY_EVENT_QUEUE_EXCLUSIVE": "event_queue_exclusive",
    "CELERY_EVENT_QUEUE_DURABLE": "event_queue_durable",
    "CELERY_EVENT_SERIALIZER": "event_serializer", "CELERY_EVENT_EXCHANGE": "event_exchange",
    "CELERY_RESULT_BACKEND": "result_backend", "CELERY_MAX_CACHED_RESULTS": "result_cache_max",
    "CELERY_RESULT_COMPRESSION": "result_compression", "CELERY_RESULT_EXCHANGE": "result_exchange",
    "CELERY_RESULT_EXCHANGE_TYPE": "result_exchange_type",
    "CELERY_TASK_RESULT_EXPIRES": "result_expires",
    "CELERY_RESULT_PERSISTENT": "result_persistent", "CELERY_RESULT_EXTENDED": "result_extended",
    "CELERY_RESULT_SERIALIZER": "result_serializer",
    "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS": "result_backend_transport_options",
    "CELERY_RESULT_CHORD_RETRY_INTERVAL": "result_chord_retry_interval",
    "CELERY_RESULT_CHORD_JOIN_TIMEOUT": "result_chord_join_timeout",
    "CELERY_RESULT_BACKEND_MAX_SLEEP_BETWEEN_RETRIES_MS":
        "result_backend_max_sleep_between_retries_ms",
    "CELERY_RESULT_BACKEND_MAX_RETRIES": "result_backend_max_retries",
    "CELERY_RESULT_BACKEND_BASE_SLEEP_BETWEEN_RETRIES_MS":
        "result_backend_base_sleep_between_retries_ms",
    "CELERY_RESULT_BACKEND_ALWAYS_RETRY": "result_backend_always_retry",
    "CELERY_SECURITY_CERTIFICATE": "security_certificate",
    "CELERY_SECURITY_CERT_STORE": "security_cert_store", "CELERY_SECURITY_KEY": "security_key",
    "CELERY_SECURITY_KEY_PASSWORD": "security_key_password",
    "CELERY_SECURITY_DIGEST": "security_digest", "CELERY_ACKS_LATE": "task_acks_late",
    "CELERY_ACKS_ON_FAILURE_OR_TIMEOUT": "task_acks_on_failure_or_timeout",
    "CELERY_ACKS_ON_FAILURE": "task_acks_on_failure",
    "CELERY_ACKS_ON_TIMEOUT": "task_acks_on_timeout", "CELERY_ALWAYS_EAGER": "task_always_eager",
    "CELERY_ANNOTATIONS": "task_annotations", "CELERY_MESSAGE_COMPRESSION": "task_compression",
    "CELERY_CREATE_MISSING_QUEUES": "task_create_missing_queues",
    "CELERY_CREATE_MISSING_QUEUE_TYPE": "task_create_missing_queue_type",
    "CELERY_CREATE_MISSING_QUEUE_EXCHANGE_TYPE": "task_create_missing_queue_exchange_type",
    "CELERY_INHERIT_PARENT_PRIORITY": "task_inherit_parent_priority",
    "CELERY_DEFAULT_DELIVERY_MODE": "task_default_delivery_mode",
    "CELERY_DEFAULT_QUEUE": "task_default_queue",
    "CELERY_DEFAULT_QUEUE_TYPE": "task_default_queue_type",
    "CELERY_DEFAULT_EXCHANGE": "task_default_exchange",
    "CELERY_DEFAULT_EXCHANGE_TYPE": "task_default_exchange_type",
    "CELERY_DEFAULT_ROUTING_KEY": "task_default_routing_key",
    "CELERY_DEFAULT_RATE_LIMIT": "task_default_rate_limit",
    "CELERY_DEFAULT_PRIORITY": "task_default_priority",
    "CELERY_EAGER_PROPAGATES_EXCEPTIONS": "task_eager_propagates",
    "CELERY_IGNORE_RESULT": "task_ignore_result",
    "CELERY_STORE_EAGER_RESULT": "task_store_eager_result",
    "CELERY_TASK_PROTOCOL": "task_protocol", "CELERY_TASK_PUBLISH_RETRY": "task_publish_retry",
    "CELERY_TASK_PUBLISH_RETRY_POLICY": "task_publish_retry_policy",
    "CELERY_QUEUES": "task_queues", "CELERY_QUEUE_MAX_PRIORITY": "task_queue_max_priority",
    "CELERY_REJECT_ON_WORKER_LOST": "task_reject_on_worker_lost",
    "CELERY_RETRY_ON_WORKER_LOST": "task_retry_on_worker_lost",
    "CELERY_REMOTE_TRACEBACKS": "task_remote_tracebacks",
    "CELERY_REPR_MAXLEVELS": "task_repr_maxlevels", "CELERY_ROUTES": "task_routes",
    "CELERY_SEND_TASK_SENT_EVENT": "task_send_sent_event",
    "CELERY_TASK_SERIALIZER": "task_serializer",
    "CELERYD_TASK_SOFT_TIME_LIMIT": "task_soft_time_limit",
    "CELERYD_TASK_TIME_LIMIT": "task_time_limit",
    "CELERY_STORE_ERRORS_EVEN_IF_IGNORED": "task_store_errors_even_if_ignored",
    "CELERY_TRACK_STARTED": "task_track_started",
    "CELERY_ALLOW_ERROR_CB_ON_CHORD_HEADER": "task_allow_error_cb_on_chord_header",
    "CELERYD_AGENT": "worker_agent", "CELERYD_AUTOSCALER": "worker_autoscaler",
    "CELERYD_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS":
        "worker_cancel_long_running_tasks_on_connection_loss",
    "CELERYD_SOFT_SHUTDOWN_TIMEOUT": "worker_soft_shutdown_timeout",
    "CELERYD_ENABLE_SOFT_SHUTDOWN_ON_IDLE": "worker_enable_soft_shutdown_on_idle",
    "CELERYD_CONCURRENCY": "worker_concurrency", "CELERYD_CONSUMER": "worker_consumer",
    "CELERY_WORKER_DIRECT": "worker_direct",
    "CELERY_DISABLE_RATE_LIMITS": "worker_disable_rate_limits",
    "CELERYD_DEDUPLICATE_SUCCESSFUL_TASKS": "worker_deduplicate_successful_tasks",
    "CELERY_ENABLE_REMOTE_CONTROL": "worker_enable_remote_control",
    "CELERYD_HIJACK_ROOT_LOGGER": "worker_hijack_root_logger",
    "CELERYD_LOG_COLOR": "worker_log_color", "CELERYD_LOG_DATEFMT": "worker_log_datefmt",
    "CELERYD_LOG_FORMAT": "worker_log_format", "CELERYD_WORKER_LOST_WAIT": "worker_lost_wait",
    "CELERYD_MAX_MEMORY_PER_CHILD": "worker_max_memory_per_child",
    "CELERYD_MAX_TASKS_PER_CHILD": "worker_max_tasks_per_child", "CELERYD_POOL": "worker_pool",
    "CELERYD_POOL_PUTLOCKS": "worker_pool_putlocks",
    "CELERYD_POOL_RESTARTS": "worker_pool_restarts",
    "CELERYD_POOL_START_METHOD": "worker_pool_start_method",
    "CELERYD_PROC_ALIVE_TIMEOUT": "worker_proc_alive_timeout",
    "CELERYD_PREFETCH_MULTIPLIER": "worker_prefetch_multiplier",
    "CELERYD_ETA_TASK_LIMIT": "worker_eta_task_limit",
    "CELERYD_ENABLE_PREFETCH_COUNT_REDUCTION": "worker_enable_prefetch_count_reduction",
    "CELERYD_DISABLE_PREFETCH": "worker_disable_prefetch",
    "CELERY_REDIRECT_STDOUTS": "worker_redirect_stdouts",
    "CELERY_REDIRECT_STDOUTS_LEVEL": "worker_redirect_stdouts_level",
    "CELERY_SEND_EVENTS": "worker_send_task_events", "CELERYD_STATE_DB": "worker_state_db",
    "CELERYD_TASK_LOG_DATEFMT": "worker_task_log_datefmt",
    "CELERYD_TASK_LOG_FORMAT": "worker_task_log_format", "CELERYD_TIMER": "worker_timer",
    "CELERYD_TIMER_PRECISION": "worker_timer_precision",
    "CELERYD_DETECT_QUORUM_QUEUES": "worker_detect_quorum_queues",
}


def check_setting(name: str, value: Any) -> Any:
    """Validate one setting; returns the normalised value."""
    setting = SETTINGS.get(name)
    if setting is not None:
        return setting.check(name, value)
    if name in CELERY_ONLY or name.startswith("_"):
        return value
    import difflib  # here, not at the top: only unknown names need it (worker memory)

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
        return self._values[OLD_NAMES.get(key, key)]

    def __setitem__(self, key: str, value: Any) -> None:
        key = OLD_NAMES.get(key, key)
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
            return self._values[OLD_NAMES.get(key, key)]
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
    old: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(key, str):
            continue
        if namespace:
            prefix = namespace.rstrip("_") + "_"
            if not key.startswith(prefix):
                continue
            key = key[len(prefix) :].lower()
        elif key in OLD_NAMES:
            old[OLD_NAMES[key]] = value
            continue
        elif key.startswith("_") or key != key.lower() or isinstance(value, ModuleType):
            continue
        out[key] = value
    # An old name counts only where the new one is not given too.
    return {**old, **out}


def read_envvar(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ImproperlyConfigured(f"config_from_envvar: environment variable {name} is not set")
    return value
