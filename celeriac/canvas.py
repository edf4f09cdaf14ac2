"""Signatures and workflows: signature, chain, group, chord, chunks, map/starmap.

A signature is a dict in Celery's wire form, so it can travel inside messages::

    {"task": "tasks.add", "args": [2], "kwargs": {}, "options": {},
     "subtask_type": null, "immutable": false}

Workflows are signatures too (``subtask_type`` "chain", "group" or "chord", members in
``kwargs``), so a canvas built with Celery's classes, turned into a dict and sent anywhere,
is rebuilt here by ``signature(d)`` and runs, and the other way round.

How a workflow runs (the messages are Celery's protocol v2, see PROTOCOL.md §1.7-1.9):

* ``freeze()`` assigns every task id up front, so the result handles exist before anything
  is sent; sending a frozen workflow reuses them.
* A chain sends its first task; the rest travels in that message's ``embed.chain``
  (reversed, ids assigned) and each worker sends the next step. A group followed by
  anything in a chain becomes a chord.
* A group sends its members with ``group``/``group_index`` headers.
* A chord records its size in the result backend, then sends the header members, each
  carrying the body in ``embed.chord``. The worker whose header task completes the chord
  (an atomic step in the backend) sends the body with the results in header order. Each
  header member has exactly one *finisher* (the task that reports to the chord): a chain
  member's last step, a nested chord's body; members with several (a chain ending in a
  group) get a ``celery.accumulate`` step that gathers them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.result import GroupResult
    from celeriac.task import Task

# Options a later merge may not change once set (as in Celery).
_IMMUTABLE_OPTIONS = frozenset({"group_id", "stamped_headers"})
# Where a task reports its result: a group or chord membership. Given to the *finisher*.
_MEMBERSHIP = ("group_id", "group_index", "chord")


def _app(app: Celery | None) -> Celery:
    from celeriac.app import current_app

    return app or current_app()


def _new_id() -> str:
    return str(uuid.uuid4())


def _wire(value: Any) -> Any:
    """Plain JSON-ready data: signatures become dicts, tuples lists, all the way down."""
    if isinstance(value, Signature):
        return value.to_wire()
    if isinstance(value, dict):
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire(v) for v in value]
    return value


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple) and not isinstance(value, Signature):
        return list(value)
    return [value]


def _first_app(sigs: Iterable[Any]) -> Celery | None:
    """The app of the first member that has one (Celery: a workflow uses its tasks' app)."""
    for sig in sigs:
        if not isinstance(sig, Signature):
            continue
        found = sig._app
        if found is None:
            found = _first_app(sig._members())
        if found is not None:
            return found
    return None


class Signature(dict[str, Any]):
    """A task call that can be sent later, passed around or put in a workflow."""

    TYPES: ClassVar[dict[str, type[Signature]]] = {}

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
            self["args"] = list(self.get("args") or ())
            self["kwargs"] = dict(self.get("kwargs") or {})
            self["options"] = dict(self.get("options") or {})
            self.setdefault("subtask_type", None)
            self["immutable"] = bool(self.get("immutable", False))
            return
        name = task if isinstance(task, str) else getattr(task, "name", None)
        if name is None:
            raise TypeError(f"signature() needs a task or a task name, not {task!r}")
        super().__init__(
            task=name,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            options={**(options or {}), **ex},
            subtask_type=subtask_type,
            immutable=bool(immutable),
        )

    @classmethod
    def register_type(cls, name: str | None = None) -> Callable[[type[Signature]],
                                                                 type[Signature]]:
        def register(subclass: type[Signature]) -> type[Signature]:
            cls.TYPES[name or subclass.__name__] = subclass
            return subclass

        return register

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: Celery | None = None) -> Signature:
        """A signature (or chain, group, chord) from its dict form."""
        kind = d.get("subtask_type")
        target = cls.TYPES.get(kind) if kind else None
        if target is not None and target is not cls:
            return target.from_dict(d, app=app)
        return Signature(d, app=app)

    # -- dict access with Celery's attribute names ------------------------------------------

    @property
    def task(self) -> str:
        return str(self["task"])

    name = task

    @property
    def args(self) -> list[Any]:
        return self["args"]

    @args.setter
    def args(self, value: Sequence[Any]) -> None:
        self["args"] = list(value)

    @property
    def kwargs(self) -> dict[str, Any]:
        return self["kwargs"]

    @kwargs.setter
    def kwargs(self, value: dict[str, Any]) -> None:
        self["kwargs"] = dict(value)

    @property
    def options(self) -> dict[str, Any]:
        return self["options"]

    @options.setter
    def options(self, value: dict[str, Any]) -> None:
        self["options"] = dict(value)

    @property
    def immutable(self) -> bool:
        return bool(self["immutable"])

    @immutable.setter
    def immutable(self, value: bool) -> None:
        self["immutable"] = bool(value)

    @property
    def subtask_type(self) -> str | None:
        return self.get("subtask_type")

    @property
    def app(self) -> Celery:
        return _app(self._app or _first_app(self._members()))

    @property
    def type(self) -> Task[Any, Any]:
        """The task this signature calls (looked up in the app's registry)."""
        return self.app.tasks[self.task]

    @property
    def id(self) -> str | None:
        return self.options.get("task_id")

    @id.setter
    def id(self, value: str) -> None:
        self.options["task_id"] = value

    @property
    def AsyncResult(self) -> Any:
        from celeriac.result import AsyncResult

        return AsyncResult

    def _members(self) -> list[Signature]:
        """The signatures inside this one (none for a task)."""
        return []

    def __repr__(self) -> str:
        args = ", ".join([repr(a) for a in self["args"]]
                         + [f"{k}={v!r}" for k, v in self["kwargs"].items()])
        return f"{self['task']}({args}){'!' if self.immutable else ''}"

    def __deepcopy__(self, memo: dict[int, Any]) -> Signature:
        return self.clone()

    def __reduce__(self) -> Any:
        return signature, (self.to_wire(),)

    def __json__(self) -> dict[str, Any]:
        return self.to_wire()

    def to_wire(self) -> dict[str, Any]:
        """Plain dict form for a message body (nested signatures included)."""
        return {
            "task": self["task"],
            "args": _wire(self["args"]),
            "kwargs": _wire(self["kwargs"]),
            "options": _wire(self["options"]),
            "subtask_type": self.get("subtask_type"),
            "immutable": self.immutable,
            **{k: _wire(v) for k, v in self.items() if k not in _SIG_KEYS},
        }

    to_dict = to_wire

    # -- building ------------------------------------------------------------------------

    def _merge(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
               options: dict[str, Any] | None = None
               ) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        """Partial args prepended, kwargs and options merged (call site wins)."""
        opts = self.options
        if options:
            opts = {**opts, **{k: v for k, v in options.items()
                               if k not in _IMMUTABLE_OPTIONS or k not in opts}}
        if self.immutable:
            return list(self["args"]), dict(self["kwargs"]), dict(opts)
        new_args = [*args, *self["args"]] if args else list(self["args"])
        new_kwargs = {**self["kwargs"], **kwargs} if kwargs else dict(self["kwargs"])
        return new_args, new_kwargs, dict(opts)

    def _clone_kwargs(self) -> dict[str, Any]:
        return dict(self["kwargs"])

    def clone(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **opts: Any) -> Self:
        """A copy with arguments added (args prepended unless immutable) and options merged.

        Members of a workflow are copied too, so freezing the copy leaves this one alone.
        """
        new_args, _, new_opts = self._merge(args, None, opts)
        cls = type(self)
        sig = cls.__new__(cls)
        dict.__init__(sig, self)  # the same extra keys
        sig.__dict__.update(self.__dict__)  # the same app
        sig["args"] = new_args
        sig["kwargs"] = self._clone_kwargs()
        if kwargs and not self.immutable and not self._members():
            sig["kwargs"].update(kwargs)
        sig["options"] = _wire(new_opts) if new_opts else {}  # fresh containers throughout
        return sig

    partial = clone

    def replace(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
                options: dict[str, Any] | None = None) -> Signature:
        sig = self.clone()
        if args is not None:
            sig.args = args
        if kwargs is not None:
            sig.kwargs = kwargs
        if options is not None:
            sig.options = options
        return sig

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        if immutable is not None:
            self.set_immutable(immutable)
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = bool(immutable)

    def _list_option(self, key: str) -> list[Any]:
        found = self.options.get(key)
        if not isinstance(found, list):
            found = self.options[key] = _listed(found)
        return found

    def link(self, callback: Any) -> Any:
        """Call ``callback`` with this task's result once it succeeds."""
        self._list_option("link").append(callback)
        return callback

    def link_error(self, errback: Any) -> Any:
        """Call ``errback`` if this task fails (see docs/canvas.md for the two forms)."""
        self._list_option("link_error").append(errback)
        return errback

    def on_error(self, errback: Any) -> Signature:
        self.link_error(errback)
        return self

    def flatten_links(self) -> list[Signature]:
        """This signature and every callback linked to it, depth first."""
        out: list[Signature] = [self]
        for link in self.options.get("link") or ():
            out.extend(maybe_signature(link, self._app).flatten_links())
        return out

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign the task id now, so the result handle exists before sending."""
        from celeriac.result import AsyncResult

        opts = self.options
        task_id = opts.setdefault("task_id", _id or _new_id())
        if root_id:
            opts["root_id"] = root_id
        if parent_id:
            opts["parent_id"] = parent_id
        if "reply_to" not in opts:
            opts["reply_to"] = self.app.oid
        if group_id and "group_id" not in opts:
            opts["group_id"] = group_id
        if chord:
            opts["chord"] = chord
        if group_index is not None:
            opts["group_index"] = group_index
        return AsyncResult(task_id, app=self.app, task_name=self.task)

    # -- combining -----------------------------------------------------------------------

    def __or__(self, other: Any) -> Any:
        if isinstance(other, chain):
            return chain(self, *other.tasks, app=self._app or other._app)
        if isinstance(other, Signature):
            return chain(self, other, app=self._app or other._app)
        return NotImplemented

    def __invert__(self) -> Any:
        return self.apply_async().get()

    # -- calling -------------------------------------------------------------------------

    def _apply(self, args: Sequence[Any] | None, kwargs: dict[str, Any] | None,
               options: dict[str, Any]) -> Any:
        """Send this signature (already private: it is not copied again)."""
        new_args, new_kwargs, opts = self._merge(args, kwargs, options)
        return self.app._send_task_signature(self.task, new_args, new_kwargs, opts)

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
        """Send the task: partial args are prepended, kwargs and options merged."""
        options = {k: v for k, v in options.items() if v is not None}
        return self._apply(args, kwargs, options)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def apply(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Any:
        """Run here and now (eagerly); returns an EagerResult."""
        new_args, new_kwargs, opts = self._merge(
            args, kwargs, {k: v for k, v in options.items() if v is not None})
        for key in ("chain", "chord", "group_id", "group_index", "reply_to"):
            opts.pop(key, None)  # workflow wiring: composites run their own steps eagerly
        return self.type.apply(new_args, new_kwargs, **opts)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task's function in this process."""
        new_args, new_kwargs, _ = self._merge(args, kwargs)
        return self.type(*new_args, **new_kwargs)


_SIG_KEYS = frozenset({"task", "args", "kwargs", "options", "subtask_type", "immutable"})


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature:
    """``signature("tasks.add", args=(2, 2))``, ``signature(a_dict)`` or a copy of one."""
    app = kwargs.pop("app", None)
    if isinstance(varies, Signature):
        return varies.clone()
    if isinstance(varies, dict):
        return Signature.from_dict(varies, app=app)
    sig = Signature(varies, *args, **kwargs)
    sig._app = app
    return sig


subtask = signature


def maybe_signature(value: Any, app: Celery | None = None, clone: bool = False) -> Any:
    """A Signature from a signature or its dict form (None stays None)."""
    if value is None:
        return None
    if isinstance(value, Signature):
        sig = value.clone() if clone else value
        if app is not None and sig._app is None:
            sig._app = app
        return sig
    if isinstance(value, dict):
        return Signature.from_dict(value, app=app)
    raise TypeError(f"not a signature: {value!r}")


def maybe_signature_list(value: Any, app: Celery | None = None) -> list[dict[str, Any]] | None:
    """Callbacks or errbacks in wire form for a message body (None when there are none)."""
    items = _listed(value)
    if not items:
        return None
    return [_wire(s) for s in items]


def _accumulate(app: Celery | None) -> Signature:
    """A task that returns what it is given: gathers a group's results into one list."""
    return Signature("celery.accumulate", (), {"index": 0}, app=app)


def _set_membership(sig: Signature, membership: dict[str, Any]) -> Signature:
    """Make ``sig`` report to a group or chord: set group_id/index/chord on its finisher.

    The finisher is the task whose result is the signature's: a chain's last step, a
    chord's body. A group has several, so it is first turned into a chord that gathers
    them (one member: the member itself). Returns the signature to use in ``sig``'s place.
    """
    if isinstance(sig, chain):
        steps = sig._normalise()
        if steps:
            steps[-1] = _set_membership(steps[-1], membership)
        return sig
    if isinstance(sig, chord):
        if sig.body is None:
            raise ValueError(f"chord {sig!r} has no body")
        sig.body = _set_membership(sig.body, membership)
        return sig
    if isinstance(sig, group):
        members = sig._flatten()
        if len(members) == 1:
            return _set_membership(members[0], membership)
        return _set_membership(chord(sig, _accumulate(sig._app), app=sig._app), membership)
    sig.options.update(membership)
    return sig


def _push_links_down(sig: Signature) -> None:
    """Before a nested chain or group is spliced into its parent: its callbacks and
    errbacks go to the steps or members that will carry them."""
    for key in ("link", "link_error"):
        for callback in _listed(sig.options.pop(key, None)):
            _link_all(sig, key, callback)


def _root_result(result: Any) -> Any:
    """The first result of a frozen workflow's result chain (follows ``parent``)."""
    seen = set()
    while getattr(result, "parent", None) is not None and id(result) not in seen:
        seen.add(id(result))
        result = result.parent
    return result


def _link_all(sig: Signature, key: str, callback: Any) -> None:
    """Attach a callback (``link``) or errback (``link_error``) where it belongs."""
    if isinstance(sig, chain):
        steps = sig._normalise()
        targets = steps[-1:] if key == "link" else steps
        for step in targets:
            _link_all(step, key, callback)
    elif isinstance(sig, group):
        if key == "link":
            # Celery: linking a group links its first task (immutably: it sees one result).
            members = sig._flatten()
            if members:
                _link_all(members[0], key, maybe_signature(callback).clone().set(immutable=True))
        else:
            for member in sig._flatten():
                _link_all(member, key, callback)
    elif isinstance(sig, chord):
        if sig.body is not None:
            _link_all(sig.body, key, callback)
        if key == "link_error" and sig.app.conf.get("task_allow_error_cb_on_chord_header"):
            for member in sig.header._flatten():
                _link_all(member, key, callback)
    else:
        sig._list_option(key).append(_wire(callback))


class _TaskList(Signature):
    """What chain and group share: member signatures in ``kwargs["tasks"]``."""

    _kind: ClassVar[str] = ""  # "chain" or "group": task name celery.<kind>, subtask_type

    def __init__(self, *tasks: Any, app: Celery | None = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], dict) and isinstance(tasks[0], Iterable):
            tasks = tuple(tasks[0])
        members = [maybe_signature(t, app) for t in tasks]
        super().__init__(f"celery.{self._kind}", (), {"tasks": members}, options,
                         subtask_type=self._kind, app=app)

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: Celery | None = None) -> Self:
        tasks = (d.get("kwargs") or {}).get("tasks") or ()
        sig = cls(*tasks, app=app, **(d.get("options") or {}))
        sig["args"] = list(d.get("args") or ())
        sig["immutable"] = bool(d.get("immutable", False))
        return sig

    @property
    def tasks(self) -> list[Signature]:
        return self["kwargs"]["tasks"]

    @tasks.setter
    def tasks(self, value: list[Signature]) -> None:
        self["kwargs"]["tasks"] = list(value)

    def _members(self) -> list[Signature]:
        return self.tasks

    def _clone_kwargs(self) -> dict[str, Any]:
        return {**self["kwargs"], "tasks": [t.clone() for t in self.tasks]}


@Signature.register_type()
class chain(_TaskList):
    """Run tasks one after another, each getting the previous result as first argument."""

    _kind = "chain"

    def __or__(self, other: Any) -> Any:
        if isinstance(other, chain):
            return chain(*self.tasks, *other.tasks, app=self._app, **self.options)
        if isinstance(other, Signature):
            return chain(*self.tasks, other, app=self._app, **self.options)
        return NotImplemented

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) or "chain()"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def unchain_tasks(self) -> list[Signature]:
        return [t.clone() for t in self._normalise()]

    def _normalise(self) -> list[Signature]:
        """The steps as they run (in place): nested chains spliced, a group followed by
        a step turned into a chord with that step as body, empty groups dropped."""
        app = self._app
        flat: list[Signature] = []

        def add(item: Any) -> None:
            sig = maybe_signature(item, app)
            if isinstance(sig, chain):
                _push_links_down(sig)
                for step in sig.tasks:
                    add(step)
            elif isinstance(sig, group) and len(sig.tasks) == 1:
                _push_links_down(sig)
                add(sig.tasks[0])
            else:
                flat.append(sig)

        for item in self.tasks:
            add(item)
        if len(flat) > 1:
            flat = [s for s in flat if not (isinstance(s, group) and not s.tasks)] or flat[:1]
        steps: list[Signature] = []
        for step in reversed(flat):
            if isinstance(step, group) and steps:
                step = chord(step, steps.pop(), app=app)
            steps.append(step)
        steps.reverse()
        self["kwargs"]["tasks"] = steps
        return steps

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign every step's id; returns the last step's result (earlier ones as parents)."""
        steps = self._normalise()
        if not steps:
            return None
        membership = {k: v for k, v in (("group_id", group_id), ("group_index", group_index),
                                        ("chord", chord)) if v is not None}
        if membership:
            _set_membership(self, membership)
        previous = None
        result: Any = None
        for index, step in enumerate(steps):
            last = index == len(steps) - 1
            result = step.freeze(_id if last else None, root_id=root_id,
                                 parent_id=parent_id if index == 0 else None)
            if previous is not None:
                _root_result(result).parent = previous
            previous = result
        return result

    def _apply(self, args: Sequence[Any] | None, kwargs: dict[str, Any] | None,
               options: dict[str, Any]) -> Any:
        opts = {**self.options, **options}
        if self.immutable:
            args, kwargs = None, None
        elif self["args"]:
            args = [*(args or ()), *self["args"]]
        task_id = opts.pop("task_id", None)
        membership = {k: opts.pop(k) for k in _MEMBERSHIP if k in opts}
        root_id, parent_id = opts.pop("root_id", None), opts.pop("parent_id", None)
        links, errbacks = _listed(opts.pop("link", None)), _listed(opts.pop("link_error", None))
        later = list(opts.pop("chain", None) or ())  # steps of an enclosing chain (reversed)
        result = self.freeze(task_id, root_id=root_id, parent_id=parent_id)
        steps = self.tasks
        if not steps:
            raise ValueError("cannot send an empty chain")
        if membership:
            _set_membership(self, membership)
        for errback in errbacks:
            _link_all(self, "link_error", errback)
        for callback in links:
            _link_all(self, "link", callback)
        rest = [*later, *[s.to_wire() for s in reversed(steps[1:])]]
        if rest:
            opts["chain"] = rest
        steps[0]._apply(args, kwargs, opts)
        return result

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
        app = self.app
        options = {k: v for k, v in options.items() if v is not None}
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        return app._send_chain(self, args, kwargs, options)

    def apply(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Any:
        steps = self.clone()._normalise()
        opts = {k: v for k, v in {**self.options, **options}.items() if v is not None}
        opts.pop("task_id", None)
        last: Any = None
        for index, step in enumerate(steps):
            if index == 0:
                result = step.apply(args, kwargs, **opts)
            else:
                result = step.apply((last.get(),), **opts)
            if last is not None:
                _root_result(result).parent = last
            last = result
        return last


@Signature.register_type()
class group(_TaskList):
    """Run tasks in parallel; the result is a GroupResult."""

    _kind = "group"

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"

    def __len__(self) -> int:
        return len(self.tasks)

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chord(self, body=other, app=self._app or other._app)
        return NotImplemented

    def __call__(self, *args: Any, **options: Any) -> Any:
        return self.apply_async(args, **options)

    def set_immutable(self, immutable: bool) -> None:
        for task in self.tasks:
            task.set_immutable(immutable)

    def link(self, callback: Any) -> Any:
        _link_all(self, "link", callback)
        return callback

    def link_error(self, errback: Any) -> Any:
        _link_all(self, "link_error", errback)
        return errback

    def skew(self, start: float = 1.0, stop: float | None = None, step: float = 1.0) -> group:
        """Give member i the countdown start + i * step (capped at stop)."""
        countdown = start
        for task in self.tasks:
            task.set(countdown=countdown if stop is None else min(countdown, stop))
            countdown += step
        return self

    def _flatten(self) -> list[Signature]:
        """The members as they run (in place): nested groups spliced, empty chains dropped."""
        app = self._app
        members: list[Signature] = []

        def add(item: Any) -> None:
            sig = maybe_signature(item, app)
            if isinstance(sig, group):
                _push_links_down(sig)
                for member in sig.tasks:
                    add(member)
            elif isinstance(sig, chain) and not sig.tasks:
                return
            else:
                members.append(sig)

        for item in self.tasks:
            add(item)
        self["kwargs"]["tasks"] = members
        return members

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> GroupResult:
        """Assign the group id and every member's id; returns the GroupResult."""
        from celeriac.result import GroupResult

        gid = self.options.setdefault("task_id", _id or _new_id())
        members = self._flatten()
        results = []
        for index, member in enumerate(members):
            membership: dict[str, Any] = {"group_id": gid, "group_index": index}
            if chord is not None:
                membership["chord"] = chord
            member = members[index] = _set_membership(member, membership)
            results.append(member.freeze(root_id=root_id, parent_id=parent_id))
        return GroupResult(gid, results, app=self.app)

    def _apply(self, args: Sequence[Any] | None, kwargs: dict[str, Any] | None,
               options: dict[str, Any]) -> Any:
        opts = {**self.options, **options}
        later = opts.pop("chain", None)
        membership = {k: opts.pop(k) for k in _MEMBERSHIP if k in opts}
        if later or membership.get("chord") is not None:
            # Not met in canvases built here (a chain turns "group, step" into a chord);
            # a foreign message may still ask it: gather the results in a chord.
            steps = [maybe_signature(s, self._app) for s in reversed(later or [])]
            body: Signature = chain(*steps, app=self._app) if steps else _accumulate(self._app)
            return chord(self, body, app=self._app)._apply(args, kwargs,
                                                           {**opts, **membership})
        if opts.pop("link", None):
            raise TypeError("Cannot add link to group: use a chord")
        errbacks = _listed(opts.pop("link_error", None))
        gid = opts.pop("task_id", None) or self.options.get("task_id") or _new_id()
        self.options["task_id"] = gid
        root_id, parent_id = opts.pop("root_id", None), opts.pop("parent_id", None)
        result = self.freeze(gid, root_id=root_id, parent_id=parent_id)
        for errback in errbacks:
            _link_all(self, "link_error", errback)
        if not self.immutable and self["args"]:
            args = [*(args or ()), *self["args"]]
        app = self.app
        with app._publishing():
            for member in self.tasks:
                member._apply(args, kwargs, opts)
        return result

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> GroupResult:
        app = self.app
        options = {k: v for k, v in options.items() if v is not None}
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        return app._send_group(self, args, kwargs, options)

    def apply(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> GroupResult:
        from celeriac.result import GroupResult

        options = {k: v for k, v in options.items() if v is not None}
        gid = options.pop("task_id", None) or options.pop("group_id", None) or _new_id()
        members = self.clone()._flatten()
        return GroupResult(gid, [m.apply(args, kwargs, **options) for m in members],
                           app=self.app)


@Signature.register_type()
class chord(Signature):
    """A group (the header) whose results, once all are in, are passed to a body task."""

    def __init__(self, header: Any, body: Any = None, task: str = "celery.chord",
                 args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
                 app: Celery | None = None, **options: Any) -> None:
        if isinstance(header, dict) and not isinstance(header, Signature):
            header = maybe_signature(header, app)
        hdr = header if isinstance(header, group) else group(header, app=app)
        extra = {k: v for k, v in (kwargs or {}).items() if k not in ("header", "body")}
        super().__init__(task, args, {"kwargs": {}, **extra, "header": hdr,
                                      "body": maybe_signature(body, app)},
                         options, subtask_type="chord", app=app)

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: Celery | None = None) -> chord:
        kw = dict(d.get("kwargs") or {})
        header, body = kw.pop("header", ()), kw.pop("body", None)
        if isinstance(header, dict) and not isinstance(header, Signature):
            header = maybe_signature(header, app)
        elif not isinstance(header, group):
            header = group(*header, app=app)
        sig = cls(header, body, args=d.get("args"), kwargs=kw, app=app,
                  **(d.get("options") or {}))
        sig["immutable"] = bool(d.get("immutable", False))
        return sig

    @property
    def header(self) -> group:
        return self["kwargs"]["header"]

    tasks = header

    @property
    def body(self) -> Signature | None:
        return self["kwargs"]["body"]

    @body.setter
    def body(self, value: Any) -> None:
        self["kwargs"]["body"] = maybe_signature(value, self._app)

    def _members(self) -> list[Signature]:
        return [*self.header.tasks, *([self.body] if self.body is not None else [])]

    def _clone_kwargs(self) -> dict[str, Any]:
        body = self.body
        return {**self["kwargs"], "header": self.header.clone(),
                "body": body.clone() if body is not None else None}

    def __repr__(self) -> str:
        return f"chord([{', '.join(repr(t) for t in self.header.tasks)}], {self.body!r})"

    def __len__(self) -> int:
        return len(self.header.tasks)

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature) and not isinstance(other, group | chain):
            sig = self.clone()
            sig.body = (sig.body | other) if sig.body is not None else other
            return sig
        return super().__or__(other)

    def __call__(self, body: Any = None, **options: Any) -> Any:
        sig = self.clone() if body is not None else self
        if body is not None:
            sig.body = body
        return sig.apply_async(**options)

    def link(self, callback: Any) -> Any:
        _link_all(self, "link", callback)
        return callback

    def link_error(self, errback: Any) -> Any:
        _link_all(self, "link_error", errback)
        return errback

    def set_immutable(self, immutable: bool) -> None:
        self.header.set_immutable(immutable)

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign every id; returns the body's result, the header's GroupResult its parent."""
        from celeriac.result import GroupResult

        body = self.body
        if body is None:
            raise ValueError("a chord needs a body")
        header = self.header
        # The group id: the header's, else the chord's own task_id (where Celery keeps it
        # when the header is a plain list, as in its dicts).
        gid = header.options.setdefault("task_id", self.options.get("task_id") or _new_id())
        membership = {k: v for k, v in (("group_id", group_id), ("group_index", group_index),
                                        ("chord", chord)) if v is not None}
        if membership:
            _set_membership(self, membership)
            body = self.body
            assert body is not None
        body_result = body.freeze(_id, root_id=root_id)
        self.options["task_id"] = gid  # as Celery's freeze: a Celery worker keeps the id
        if not isinstance(body, chain | group | chord_type):
            body.options.setdefault("group_id", gid)
        members = header._flatten()
        results = []
        for index, member in enumerate(members):
            member = members[index] = _set_membership(
                member, {"group_id": gid, "group_index": index})
            results.append(member.freeze(root_id=root_id, parent_id=parent_id))
        _root_result(body_result).parent = GroupResult(gid, results, app=self.app)
        return body_result

    def _apply(self, args: Sequence[Any] | None, kwargs: dict[str, Any] | None,
               options: dict[str, Any]) -> Any:
        opts = {**self.options, **options}
        if self["args"] and not self.immutable:
            args = [*(args or ()), *self["args"]]
        body_id = options.get("task_id")  # apply_async(task_id=...) names the body
        opts.pop("task_id", None)
        membership = {k: opts.pop(k) for k in _MEMBERSHIP if k in opts}
        root_id, parent_id = opts.pop("root_id", None), opts.pop("parent_id", None)
        links, errbacks = _listed(opts.pop("link", None)), _listed(opts.pop("link_error", None))
        later = opts.pop("chain", None)
        header_delay: dict[str, Any] = {k: opts.pop(k) for k in ("countdown", "eta")
                                        if k in opts}
        if membership:
            _set_membership(self, membership)
        result = self.freeze(body_id, root_id=root_id, parent_id=parent_id)
        body = self.body
        assert body is not None
        if later:
            # The steps after this chord in an enclosing chain run after the body.
            body.options["chain"] = [*later, *(body.options.get("chain") or ())]
        for callback in links:
            _link_all(body, "link", callback)
        for errback in errbacks:
            _link_all(self, "link_error", errback)
        body.options.update(opts)  # options of the chord (queue, priority...) reach the body
        header = self.header
        gid = str(header.options["task_id"])
        members = header.tasks
        app = self.app
        if not members:
            body._apply([[]], None, {})
            return result
        app._chord_start(gid, len(members))
        body_wire = body.to_wire()
        header_opts = {**opts, **header_delay}
        with app._publishing():
            for index, member in enumerate(members):
                member = _set_membership(member, {"group_id": gid, "group_index": index,
                                                  "chord": body_wire})
                member._apply(args, kwargs, header_opts)
        return result

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
        app = self.app
        options = {k: v for k, v in options.items() if v is not None}
        body = (kwargs or {}).get("body") if isinstance(kwargs, dict) else None
        sig: chord = self
        if body is not None:
            kwargs = {k: v for k, v in (kwargs or {}).items() if k != "body"}
            sig = self.clone()
            sig.body = body
        if app.conf.task_always_eager:
            return sig.apply(args, kwargs, **options)
        return app._send_chord(sig, args, kwargs, options)

    def apply(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              propagate: bool = True, body: Any = None, **options: Any) -> Any:
        body_sig = maybe_signature(body, self._app) if body is not None else self.body
        if body_sig is None:
            raise ValueError("a chord needs a body")
        options = {k: v for k, v in options.items() if v is not None}
        options.pop("task_id", None)
        header = self.header.apply(args, kwargs, **options)
        values = header.get(propagate=propagate, disable_sync_subtasks=False)
        result = body_sig.clone().apply((values,), **options)
        _root_result(result).parent = header
        return result


chord_type = chord  # the class, where a parameter named ``chord`` hides it


class _basemap(Signature):
    """One task message whose worker calls ``task`` once per item (serially)."""

    _task_name = ""

    def __init__(self, task: Any, it: Iterable[Any], app: Celery | None = None,
                 **options: Any) -> None:
        sig = maybe_signature(task, app) if isinstance(task, dict) else task
        items = [list(i) if isinstance(i, tuple) else i for i in it]
        super().__init__(self._task_name, (), {"task": sig, "it": items}, options,
                         immutable=True, app=app or getattr(sig, "_app", None))

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: Celery | None = None) -> _basemap:
        kw = d.get("kwargs") or {}
        return cls(kw["task"], kw.get("it") or (), app=app, **(d.get("options") or {}))


class xmap(_basemap):
    """``[task(item) for item in it]`` in one task (``celery.map``)."""

    _task_name = "celery.map"

    def __repr__(self) -> str:
        return f"[{self.kwargs['task']['task']}(x) for x in {self.kwargs['it']!r}]"


class xstarmap(_basemap):
    """``[task(*item) for item in it]`` in one task (``celery.starmap``)."""

    _task_name = "celery.starmap"

    def __repr__(self) -> str:
        return f"[{self.kwargs['task']['task']}(*x) for x in {self.kwargs['it']!r}]"


class chunks(Signature):
    """Split ``it`` into parts of ``n`` items; each part runs as one starmap task."""

    def __init__(self, task: Any, it: Iterable[Any], n: int, app: Celery | None = None,
                 **options: Any) -> None:
        sig = maybe_signature(task, app) if isinstance(task, dict) else task
        items = [list(i) if isinstance(i, tuple) else i for i in it]
        super().__init__("celery.chunks", (), {"task": sig, "it": items, "n": int(n)}, options,
                         immutable=True, app=app or getattr(sig, "_app", None))

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: Celery | None = None) -> chunks:
        kw = d.get("kwargs") or {}
        return cls(kw["task"], kw.get("it") or (), kw["n"], app=app, **(d.get("options") or {}))

    def group(self) -> group:
        task, items, n = self.kwargs["task"], self.kwargs["it"], self.kwargs["n"]
        return group([xstarmap(task, items[i:i + n], app=self._app)
                      for i in range(0, len(items), n)], app=self._app)

    def __call__(self, **options: Any) -> Any:
        return self.apply_async(**options)

    def _apply(self, args: Sequence[Any] | None, kwargs: dict[str, Any] | None,
               options: dict[str, Any]) -> Any:
        return self.group()._apply(args, kwargs, {**self.options, **options})

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
        return self.group().apply_async(args, kwargs, **{**self.options, **options})

    def apply(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Any:
        return self.group().apply(args, kwargs, **options)

    @classmethod
    def apply_chunks(cls, task: Any, it: Iterable[Any], n: int,
                     app: Celery | None = None) -> Any:
        return cls(task, it, n, app=app)()
