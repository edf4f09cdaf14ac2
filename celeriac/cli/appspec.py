"""Finding the app that ``-A`` names, and turning errors into one line; no click here.

The worker process runs without click (see celeriac/worker/__main__.py), so what both the
CLI and the worker need lives in this small module.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module
from types import FunctionType
from typing import Any

from celeriac.app import Celery
from celeriac.exceptions import CeleriacError, ImproperlyConfigured


class AppNotFound(Exception):
    """``-A`` names nothing usable; the message says what and where."""


def find_app(spec: str) -> Celery:
    """Resolve ``-A`` like Celery: ``module``, ``module:attr``, ``module.attr`` or a package."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    try:
        module = _import(spec, module_name)
    except ModuleNotFoundError as exc:
        if attr or "." not in module_name or exc.name != module_name:
            raise AppNotFound(f"-A {spec}: cannot import {exc.name!r}") from None
        # "pkg.mod.attr": the last part may be an attribute.
        module_name, _, attr = module_name.rpartition(".")
        try:
            module = _import(spec, module_name)
        except ModuleNotFoundError as exc2:
            raise AppNotFound(f"-A {spec}: cannot import {exc2.name!r}") from None
    if attr:
        found = getattr(module, attr, None)
        if isinstance(found, FunctionType):  # an app factory, as Celery allows (never a task)
            try:
                found = found()
            except Exception as exc:
                raise AppNotFound(
                    f"-A {spec}: calling {attr}() raised {type(exc).__name__}: {exc}"
                ) from None
        if not isinstance(found, Celery):
            raise AppNotFound(f"-A {spec}: {attr!r} is not a celeriac app")
        return found
    for name in ("app", "celery"):
        found = getattr(module, name, None)
        if isinstance(found, Celery):
            return found
    for found in vars(module).values():
        if isinstance(found, Celery):
            return found
    if hasattr(module, "__path__"):  # a package: look in pkg.celery as Celery does
        try:
            return find_app(f"{module_name}.celery")
        except AppNotFound:
            pass
    raise AppNotFound(f"-A {spec}: no celeriac app found in module {module_name!r}")


def _import(spec: str, module_name: str) -> Any:
    """Import the app's module; its own errors become one line naming where they happened."""
    try:
        return import_module(module_name)
    except (ModuleNotFoundError, CeleriacError):
        raise
    except Exception as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb else ""
        raise AppNotFound(
            f"-A {spec}: importing {module_name!r} raised {type(exc).__name__}: {exc}{where}"
        ) from None


def one_line(exc: BaseException) -> str | None:
    """The one line a command prints for ``exc``, or None to let it propagate (a traceback)."""
    if isinstance(exc, AppNotFound):
        return str(exc)
    if isinstance(exc, (CeleriacError, ImproperlyConfigured, ValueError, OSError,
                        NotImplementedError)):
        return f"{type(exc).__name__}: {exc}"
    if os.environ.get("CELERIAC_TRACEBACK"):
        return None
    # Anything else (a server library's connection error, a bug): still one line, with the
    # way to see the traceback.
    return f"{type(exc).__name__}: {exc} (set CELERIAC_TRACEBACK=1 for the traceback)"
