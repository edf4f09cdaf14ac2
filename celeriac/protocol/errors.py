"""Exceptions on the wire, in Celery's result format.

``{"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"}``.

Result data never chooses what to import: a type is rebuilt only if it is a built-in
exception, one of ours (or Celery's name for it), registered with the app, or already
imported by this process; anything else comes back as a stand-in subclass of
``RemoteTaskError`` with the same name and arguments.
"""

from __future__ import annotations

import builtins
import sys
from typing import Any

from celeriac import exceptions as own_exceptions
from celeriac.exceptions import RemoteTaskError

_OUR_MODULES = {"celeriac.exceptions", "celery.exceptions", "billiard.exceptions"}
_stand_ins: dict[tuple[str, str], type[BaseException]] = {}


def _jsonable_args(exc: BaseException) -> list[Any]:
    out: list[Any] = []
    for arg in exc.args:
        if arg is None or isinstance(arg, str | int | float | bool | list | tuple | dict):
            out.append(arg)
        else:
            out.append(repr(arg))
    return out


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    module = cls.__module__
    if module == "celeriac.exceptions":
        module = "celery.exceptions"  # what Celery peers expect to find
    if isinstance(exc, RemoteTaskError) and exc.exc_module:
        module = exc.exc_module
    return {"exc_type": cls.__name__, "exc_message": _jsonable_args(exc), "exc_module": module}


def _resolve(module: str, name: str, registered: dict[str, type[BaseException]]) -> type | None:
    found = registered.get(f"{module}.{name}") or registered.get(name)
    if found is not None:
        return found
    if module == "builtins":
        candidate = getattr(builtins, name, None)
    elif module in _OUR_MODULES:
        candidate = getattr(own_exceptions, name, None)
    else:
        loaded = sys.modules.get(module)  # never import: only what this process already has
        candidate = getattr(loaded, name, None) if loaded is not None else None
    if isinstance(candidate, type) and issubclass(candidate, BaseException):
        return candidate
    return None


def _stand_in(module: str, name: str) -> type[BaseException]:
    key = (module, name)
    cls = _stand_ins.get(key)
    if cls is None:
        safe_name = name if name.isidentifier() else "RemoteError"
        cls = type(safe_name, (RemoteTaskError,), {"exc_module": module, "__module__": module})
        _stand_ins[key] = cls
    return cls


def exception_from_dict(
    data: Any, registered: dict[str, type[BaseException]] | None = None
) -> BaseException:
    """Rebuild an exception from a result document's ``result`` field."""
    if isinstance(data, BaseException):
        return data
    if not isinstance(data, dict) or "exc_type" not in data:
        return RemoteTaskError(repr(data))
    name = str(data.get("exc_type"))
    module = str(data.get("exc_module") or "builtins")
    message = data.get("exc_message")
    args = tuple(message) if isinstance(message, list | tuple) else (message,)
    cls = _resolve(module, name, registered or {}) or _stand_in(module, name)
    try:
        rebuilt: BaseException = cls(*args)
        return rebuilt
    except Exception:
        # Some exception classes take keyword-only or differently shaped arguments.
        exc = _stand_in(module, name)(*args)
        return exc
