"""Signatures and workflows: signature, chain, group, chord, chunks, map/starmap.

A signature is a dict in Celery's wire form, so it can travel inside messages::

    {"task": "tasks.add", "args": [2], "kwargs": {}, "options": {},
     "subtask_type": null, "immutable": false}
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.result import AsyncResult, GroupResult


def _app(app: Celery | None) -> Celery:
    from celeriac.app import current_app

    return app or current_app()


def _first_app(sigs: Iterable[Any]) -> Celery | None:
    """The app of the first member that has one (Celery: a workflow uses its tasks' app)."""
    for sig in sigs:
        if not isinstance(sig, Signature):
            continue
        found = sig._app
        if found is None and isinstance(sig, chain | group):
            found = _first_app(sig.tasks)
        elif found is None and isinstance(sig, chord):
            found = _first_app([*sig.header.tasks, sig.body])
        if found is not None:
            return found
    return None


class Signature(dict[str, Any]):
    """A task call that can be sent later, passed around or put in a workflow."""

    def __init__(
        self,
        task: Any = None,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        type: Any = None,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Celery | None = None,
        **ex: Any,
    ) -> None:
        self._app = app
        if isinstance(task, dict):
            super().__init__(task)
            self.setdefault("args", [])
            self.setdefault("kwargs", {})
            self.setdefault("options", {})
            self.setdefault("subtask_type", None)
            self.setdefault("immutable", False)
            return
        name = task if isinstance(task, str) else getattr(task, "name", None)
        if name is None and subtask_type is None:
            raise TypeError(f"signature() needs a task or a task name, not {task!r}")
        super().__init__(
            task=name,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            options={**(options or {}), **ex},
            subtask_type=subtask_type,
            immutable=immutable,
        )

    # dict access with Celery's attribute names
    @property
    def task(self) -> str:
        return str(self["task"])

    @property
    def name(self) -> str:
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        return list(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self["kwargs"])

    @property
    def options(self) -> dict[str, Any]:
        return self["options"]  # type: ignore[no-any-return]

    @property
    def immutable(self) -> bool:
        return bool(self["immutable"])

    @property
    def subtask_type(self) -> str | None:
        return self.get("subtask_type")

    @property
    def app(self) -> Celery:
        return _app(self._app)

    @property
    def id(self) -> str | None:
        return self.options.get("task_id")

    def __repr__(self) -> str:
        args = ", ".join([repr(a) for a in self["args"]]
                         + [f"{k}={v!r}" for k, v in self["kwargs"].items()])
        return f"{self['task']}({args}){'!' if self.immutable else ''}"

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chain(self, other, app=self._app)
        return NotImplemented

    def __deepcopy__(self, memo: dict[int, Any]) -> Signature:
        return type(self)(copy.deepcopy(dict(self), memo), app=self._app)

    def clone(
        self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None, **opts: Any
    ) -> Signature:
        """A copy with arguments added (args prepended unless immutable) and options merged."""
        sig = copy.deepcopy(self)
        if not sig.immutable:
            if args:
                sig["args"] = list(args) + sig["args"]
            if kwargs:
                sig["kwargs"] = {**sig["kwargs"], **kwargs}
        sig["options"].update(opts)
        return sig

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        if immutable is not None:
            self["immutable"] = immutable
        self["options"].update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = immutable

    def link(self, callback: Signature) -> Signature:
        self["options"].setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: Signature) -> Signature:
        self["options"].setdefault("link_error", []).append(errback)
        return errback

    def freeze(self, _id: str | None = None, **_: Any) -> AsyncResult[Any]:
        """Assign the task id now, so the result handle exists before sending."""
        from celeriac.result import AsyncResult

        task_id = self.options.setdefault("task_id", _id or str(uuid.uuid4()))
        return AsyncResult(task_id, app=self.app, task_name=self.task)

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        sig = self.clone(args, kwargs, **options) if (args or kwargs or options) else self
        opts = dict(sig.options)
        app = self.app
        task = app.tasks.get(sig.task)
        if task is not None:
            return task.apply_async(sig["args"], sig["kwargs"], **opts)
        return app.send_task(sig.task, sig["args"], sig["kwargs"], **opts)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def apply(
        self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        sig = self.clone(args, kwargs, **options)
        return self.app.tasks[sig.task].apply(sig["args"], sig["kwargs"], **sig.options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sig = self.clone(args, kwargs)
        return self.app.tasks[sig.task](*sig["args"], **sig["kwargs"])

    def to_wire(self) -> dict[str, Any]:
        """Plain dict form for a message body (nested signatures included)."""
        out = dict(self)
        opts = dict(self.options)
        for key in ("link", "link_error"):
            if key in opts:
                opts[key] = [dict(s) for s in opts[key]]
        out["options"] = opts
        return out


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature:
    """``signature("tasks.add", args=(2, 2))`` or ``signature(a_dict)``."""
    app = kwargs.pop("app", None)
    if isinstance(varies, dict) and not isinstance(varies, Signature):
        return _from_dict(varies, app)
    if isinstance(varies, Signature):
        return varies.clone()
    return Signature(varies, *args, app=app, **kwargs)


subtask = signature


def maybe_signature(value: Any, app: Celery | None = None) -> Signature | None:
    if value is None:
        return None
    if isinstance(value, Signature):
        return value
    if isinstance(value, dict):
        return _from_dict(value, app)
    raise TypeError(f"not a signature: {value!r}")


def maybe_signature_list(value: Any, app: Celery | None = None) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    return [s.to_wire() if isinstance(s, Signature) else dict(s) for s in items]


def _from_dict(data: dict[str, Any], app: Celery | None) -> Signature:
    kind = data.get("subtask_type")
    cls = _TYPES.get(kind or "", Signature)
    if cls is Signature:
        return Signature(data, app=app)
    return cls.from_dict(data, app=app)  # type: ignore[attr-defined, no-any-return]


class chain(Signature):
    """Run tasks one after another, each getting the previous result as first argument."""

    def __init__(self, *tasks: Any, app: Celery | None = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Signature) and isinstance(
            tasks[0], Iterable
        ):
            tasks = tuple(tasks[0])
        flat: list[Signature] = []
        for t in tasks:
            t = maybe_signature(t, app) or t
            if isinstance(t, chain):
                flat.extend(t.tasks)
            else:
                flat.append(t)
        super().__init__("celery.chain", (), {"tasks": flat}, options, subtask_type="chain",
                         app=app)

    @property
    def tasks(self) -> list[Signature]:
        return self["kwargs"]["tasks"]  # type: ignore[no-any-return]

    @property
    def app(self) -> Celery:
        return _app(self._app or _first_app(self.tasks))

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celery | None = None) -> chain:
        tasks = [maybe_signature(t, app) for t in data["kwargs"]["tasks"]]
        return cls(*tasks, app=app, **data.get("options", {}))

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chain(*self.tasks, other, app=self._app)
        return NotImplemented

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) or "chain()"

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        return self.app._send_chain(self, args, kwargs, options)

    def apply(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Any:
        result: Any = None
        first = True
        for sig in self.tasks:
            sig = sig.clone(args, kwargs) if first else sig.clone([result.get()])
            first = False
            result = sig.apply(**options)
        return result


class group(Signature):
    """Run tasks in parallel; the result is a GroupResult."""

    def __init__(self, *tasks: Any, app: Celery | None = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Signature):
            tasks = tuple(tasks[0])
        sigs = [maybe_signature(t, app) for t in tasks]
        super().__init__("celery.group", (), {"tasks": sigs}, options, subtask_type="group",
                         app=app)

    @property
    def tasks(self) -> list[Signature]:
        return self["kwargs"]["tasks"]  # type: ignore[no-any-return]

    @property
    def app(self) -> Celery:
        return _app(self._app or _first_app(self.tasks))

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celery | None = None) -> group:
        return cls(*data["kwargs"]["tasks"], app=app, **data.get("options", {}))

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"

    def __len__(self) -> int:
        return len(self.tasks)

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> GroupResult:
        return self.app._send_group(self, args, kwargs, options)

    def apply(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> GroupResult:
        from celeriac.result import GroupResult

        gid = options.pop("group_id", None) or str(uuid.uuid4())
        return GroupResult(gid, [s.apply(args, kwargs, **options) for s in self.tasks],
                           app=self.app)


class chord(Signature):
    """A group (the header) whose results, once all are in, are passed to a body task."""

    def __init__(self, header: Any, body: Any = None, app: Celery | None = None,
                 **options: Any) -> None:
        hdr = header if isinstance(header, group) else group(header, app=app)
        super().__init__("celery.chord", (), {"header": hdr, "body": maybe_signature(body, app)},
                         options, subtask_type="chord", app=app)

    @property
    def header(self) -> group:
        return self["kwargs"]["header"]  # type: ignore[no-any-return]

    @property
    def body(self) -> Signature | None:
        return self["kwargs"]["body"]  # type: ignore[no-any-return]

    @property
    def app(self) -> Celery:
        return _app(self._app or _first_app([*self.header.tasks, self.body]))

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celery | None = None) -> chord:
        kw = data["kwargs"]
        return cls(maybe_signature(kw["header"], app), kw.get("body"), app=app,
                   **data.get("options", {}))

    def __call__(self, body: Any = None, **options: Any) -> Any:  # type: ignore[override]
        if body is not None:
            self["kwargs"]["body"] = maybe_signature(body, self._app)
        return self.apply_async(**options)

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        return self.app._send_chord(self, args, kwargs, options)

    def apply(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Any:
        results = self.header.apply(args, kwargs)
        assert self.body is not None
        return self.body.clone([results.get()]).apply()


def chunks(sig: Signature, it: Iterable[Any], n: int, app: Celery | None = None) -> group:
    """Split ``it`` into parts of ``n``; each part runs as one task calling ``sig`` per item."""
    items = list(it)
    parts = [items[i : i + n] for i in range(0, len(items), n)]
    return group([xstarmap(sig, part, app=app) for part in parts], app=app)


def xmap(sig: Signature, it: Iterable[Any], app: Celery | None = None) -> Signature:
    return Signature("celery.map", (), {"task": dict(sig), "it": list(it)}, app=app)


def xstarmap(sig: Signature, it: Iterable[Any], app: Celery | None = None) -> Signature:
    return Signature("celery.starmap", (), {"task": dict(sig), "it": [list(a) for a in it]},
                     app=app)


_TYPES: dict[str, type[Signature]] = {"chain": chain, "group": group, "chord": chord}
