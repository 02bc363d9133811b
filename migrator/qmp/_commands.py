"""QMP command registry and QAPI-style argument validation.

Commands are declared next to the code that implements them::

    class VM:
        @command("query-status")
        def query_status(self) -> dict:
            return {"running": True, "status": "running"}

        @command("migrate", args={"uri": str, "*resume": bool})
        async def migrate(self, uri: str, resume: bool = False) -> None:
            ...

    table = CommandTable.from_objects(vm)
    reply = await table.dispatch(request)      # a Return or an ErrorReply

The ``args`` schema follows QAPI: member names as on the wire, a leading
``*`` marks an optional member, and types are Python types (``str``, ``int``
= QAPI ``int``/int64, ``bool``, ``float`` = ``number``, ``list``, ``dict``,
``object`` = ``any``), a one-element list ``[T]`` for arrays of T, a nested
dict for a struct, or one of the QAPI types defined here (``UINT8``,
``UINT32``, ``UINT64``, ``SIZE``, ``Enum(...)``, ``STR_OR_NULL``...).

Handlers receive the validated members as keyword arguments with ``-``
replaced by ``_``; absent optional members are not passed, so the handler's
defaults apply (QAPI's ``has_x``).  Nested structs arrive as dicts with wire
names.  Handlers may be plain functions or coroutines.

How QEMU validates (qapi/qobject-input-visitor.c, qapi-visit-core.c), which we
mirror word for word because clients match on these descriptions:

* All validation runs before the handler, so a rejected command has no side
  effects.  Members are visited in schema order; missing or mistyped members
  are reported first, then the first unexpected key ("Parameter 'x' is
  unexpected", from ``visit_check_struct``).
* Missing: "Parameter 'x' is missing".  Wrong JSON type: "Invalid parameter
  type for 'x', expected: integer" (string, boolean, number, object, array).
  Names are full paths: ``capabilities[0].state``.
* ``uint64``/``size`` reject non-integers with "Parameter 'x' expects uint64"
  and accept negative integers "for backward compatibility", wrapping them
  modulo 2**64.  Narrower types then check the range and word it with the
  bare member name and the C type: "Parameter 'x' expects uint8_t".
* An enum value not in the list: "Parameter 'x' does not accept value 'y'",
  again with the bare member name, which is "null" for list elements.
* ``number`` accepts integers and floats; the integer types refuse ``1.0``
  (QEMU keeps a JSON ``1.0`` a double).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ._protocol import ErrorReply, Request, Return
from ..errors import ErrorClass, QMPError

__all__ = [
    "ANY",
    "BOOL",
    "INT",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "NUMBER",
    "SIZE",
    "STR",
    "STR_OR_NULL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "ArgType",
    "Command",
    "CommandTable",
    "Enum",
    "ListOf",
    "Struct",
    "command",
]

logger = logging.getLogger("migrator.qmp")

_F = TypeVar("_F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------
# Error wording (qapi/qmp/qerror.h and the visitors)


def _missing(path: str) -> QMPError:
    return QMPError.generic(f"Parameter '{path}' is missing")


def _bad_type(path: str, expected: str) -> QMPError:
    return QMPError.generic(f"Invalid parameter type for '{path}', expected: {expected}")


def _bad_value(name: str, expects: str) -> QMPError:
    return QMPError.generic(f"Parameter '{name}' expects {expects}")


def _unexpected(path: str) -> QMPError:
    return QMPError.generic(f"Parameter '{path}' is unexpected")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Types


class ArgType:
    """A QAPI type: converts a decoded JSON value or raises :class:`QMPError`.

    ``path`` is the member's full name (``a.b[2].c``) used by visitor-level
    errors; ``name`` is the bare member name (``None`` for list elements)
    used by range and enum errors, as QEMU does.
    """

    qapi_name = "any"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.qapi_name}>"


class _Any(ArgType):
    qapi_name = "any"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        return value


class _Str(ArgType):
    qapi_name = "str"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        if not isinstance(value, str):
            raise _bad_type(path, "string")
        return value


class _Bool(ArgType):
    qapi_name = "bool"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        if not isinstance(value, bool):
            raise _bad_type(path, "boolean")
        return value


class _Number(ArgType):
    qapi_name = "number"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad_type(path, "number")
        return float(value)


class _Object(ArgType):
    """Any JSON object, members unchecked (``dict`` in a schema)."""

    qapi_name = "object"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        if not isinstance(value, dict):
            raise _bad_type(path, "object")
        return value


class _Array(ArgType):
    """Any JSON array, elements unchecked (``list`` in a schema)."""

    qapi_name = "array"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        if not isinstance(value, list):
            raise _bad_type(path, "array")
        return value


class _SignedInt(ArgType):
    def __init__(self, bits: int, c_name: str) -> None:
        self.min = -(1 << (bits - 1))
        self.max = (1 << (bits - 1)) - 1
        self.c_name = c_name
        self.qapi_name = "int" if bits == 64 else f"int{bits}"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        # qobject_input_type_int64: anything but an int64-representable integer
        # is a type error.
        if not _is_int(value) or not (-(1 << 63) <= value < (1 << 63)):
            raise _bad_type(path, "integer")
        if not (self.min <= value <= self.max):
            raise _bad_value(name or "null", self.c_name)
        return value


class _UnsignedInt(ArgType):
    def __init__(self, bits: int, c_name: str | None, qapi_name: str) -> None:
        self.max = (1 << bits) - 1
        self.c_name = c_name
        self.qapi_name = qapi_name

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        # qobject_input_type_uint64: a uint64, or an int64 reinterpreted
        # ("Need to accept negative values for backward compatibility").
        if not _is_int(value) or not (-(1 << 63) <= value < (1 << 64)):
            raise _bad_value(path, "uint64")
        value %= 1 << 64
        if value > self.max:
            raise _bad_value(name or "null", self.c_name or "uint64")
        return value


class Enum(ArgType):
    """A QAPI enum: a string from a fixed list."""

    def __init__(self, values: Iterable[str], qapi_name: str = "enum") -> None:
        self.values: tuple[str, ...] = tuple(values)
        self.qapi_name = qapi_name

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        if not isinstance(value, str):
            raise _bad_type(path, "string")
        if value not in self.values:
            raise QMPError.generic(f"Parameter '{name or 'null'}' does not accept value '{value}'")
        return value


class _StrOrNull(ArgType):
    """QAPI's ``StrOrNull`` alternate; JSON null converts to ``None``."""

    qapi_name = "StrOrNull"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        if value is None or isinstance(value, str):
            return value
        # Generated alternate visitors word it with the bare name.
        raise _bad_type(name or "null", "StrOrNull")


class ListOf(ArgType):
    """A QAPI array ``[T]``."""

    def __init__(self, item: Any) -> None:
        self.item = as_arg_type(item)
        self.qapi_name = f"[{self.item.qapi_name}]"

    def convert(self, value: Any, path: str, name: str | None) -> Any:
        if not isinstance(value, list):
            raise _bad_type(path, "array")
        return [self.item.convert(v, f"{path}[{i}]", None) for i, v in enumerate(value)]


@dataclass(frozen=True, slots=True)
class _Member:
    name: str  # wire name
    pyname: str  # keyword-argument name
    type: ArgType
    optional: bool


class Struct(ArgType):
    """A QAPI struct: ``{"name": T, "*optional": U}``."""

    qapi_name = "object"

    def __init__(self, members: Mapping[str, Any]) -> None:
        parsed = []
        for key, spec in members.items():
            optional = key.startswith("*")
            wire = key[1:] if optional else key
            pyname = wire.replace("-", "_")
            if not pyname.isidentifier():
                raise ValueError(f"member name {wire!r} cannot be a Python keyword argument")
            parsed.append(_Member(wire, pyname, as_arg_type(spec), optional))
        self.members: tuple[_Member, ...] = tuple(parsed)
        self._names = frozenset(m.name for m in self.members)

    def convert(self, value: Any, path: str, name: str | None) -> dict[str, Any]:
        """Validate an object; returns a dict keyed by wire names."""
        if not isinstance(value, dict):
            raise _bad_type(path or "null", "object")
        out: dict[str, Any] = {}
        for m in self.members:
            child = f"{path}.{m.name}" if path else m.name
            if m.name in value:
                out[m.name] = m.type.convert(value[m.name], child, m.name)
            elif not m.optional:
                raise _missing(child)
        for key in value:
            if key not in self._names:
                raise _unexpected(f"{path}.{key}" if path else key)
        return out

    def to_kwargs(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a command's ``arguments``; returns Python keyword arguments."""
        checked = self.convert(dict(arguments), "", None)
        by_wire = {m.name: m.pyname for m in self.members}
        return {by_wire[k]: v for k, v in checked.items()}


ANY: Final = _Any()
STR: Final = _Str()
BOOL: Final = _Bool()
NUMBER: Final = _Number()
INT: Final = _SignedInt(64, "int64_t")
INT64: Final = INT
INT8: Final = _SignedInt(8, "int8_t")
INT16: Final = _SignedInt(16, "int16_t")
INT32: Final = _SignedInt(32, "int32_t")
UINT8: Final = _UnsignedInt(8, "uint8_t", "uint8")
UINT16: Final = _UnsignedInt(16, "uint16_t", "uint16")
UINT32: Final = _UnsignedInt(32, "uint32_t", "uint32")
UINT64: Final = _UnsignedInt(64, None, "uint64")
SIZE: Final = _UnsignedInt(64, None, "size")
STR_OR_NULL: Final = _StrOrNull()

_PY_TYPES: Final[dict[Any, ArgType]] = {
    str: STR,
    bool: BOOL,
    int: INT,
    float: NUMBER,
    dict: _Object(),
    list: _Array(),
    object: ANY,
    Any: ANY,
}


def as_arg_type(spec: Any) -> ArgType:
    """Turn a schema spec (see module docstring) into an :class:`ArgType`."""
    if isinstance(spec, ArgType):
        return spec
    if isinstance(spec, list):
        if len(spec) != 1:
            raise TypeError(f"an array type is written [T], got {spec!r}")
        return ListOf(spec[0])
    if isinstance(spec, dict):
        return Struct(spec)
    try:
        return _PY_TYPES[spec]
    except (KeyError, TypeError):
        raise TypeError(f"not a QMP argument type: {spec!r}") from None


# ---------------------------------------------------------------------------
# Commands


@dataclass(frozen=True, slots=True)
class Command:
    """A registered command: its QMP name, argument schema and handler."""

    name: str
    args: Struct
    handler: Callable[..., Any]


@dataclass(frozen=True, slots=True)
class _Declaration:
    name: str
    args: Struct


_ATTR = "__qmp_command__"


def command(name: str, *, args: Mapping[str, Any] | None = None) -> Callable[[_F], _F]:
    """Declare a function or method as the QMP command ``name``.

    Args:
        name: the command name on the wire (``query-migrate``, ``migrate_cancel``).
        args: the QAPI-style argument schema (module docstring); ``None`` means
            the command takes no arguments (any argument is then unexpected).

    The decorated function is unchanged; :meth:`CommandTable.register` finds it.
    Schema errors (unknown types, bad member names) raise at decoration time.
    """
    schema = Struct(args or {})

    def decorate(fn: _F) -> _F:
        setattr(fn, _ATTR, _Declaration(name, schema))
        return fn

    return decorate


class CommandTable:
    """The set of commands a QMP server executes.

    Build it with :meth:`from_objects`, :meth:`register` (decorated methods or
    functions) or :meth:`add` (explicit).  Names are unique; registering a
    name twice raises ``ValueError``.
    """

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    @classmethod
    def from_objects(cls, *objs: Any) -> CommandTable:
        """A table with the decorated commands of each object (or function)."""
        table = cls()
        for obj in objs:
            table.register(obj)
        return table

    def add(self, name: str, handler: Callable[..., Any], *, args: Mapping[str, Any] | None = None) -> None:
        """Register ``handler`` as command ``name`` with the given schema."""
        self._add(Command(name, Struct(args or {}), handler))

    def _add(self, cmd: Command) -> None:
        if cmd.name in self._commands:
            raise ValueError(f"QMP command {cmd.name!r} registered twice")
        self._commands[cmd.name] = cmd

    def register(self, obj: Any) -> None:
        """Register a decorated function, or every decorated method of ``obj``.

        Methods are looked up on the class (so properties are never
        evaluated) and bound to ``obj``.

        Raises:
            ValueError: ``obj`` declares no command, or a name is taken.
        """
        decl = getattr(obj, _ATTR, None)
        if isinstance(decl, _Declaration) and callable(obj):
            self._add(Command(decl.name, decl.args, obj))
            return
        found = False
        seen: set[str] = set()
        for klass in type(obj).__mro__:
            for attr, member in vars(klass).items():
                if attr in seen:
                    continue
                seen.add(attr)
                fn = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                decl = getattr(fn, _ATTR, None)
                if isinstance(decl, _Declaration):
                    self._add(Command(decl.name, decl.args, getattr(obj, attr)))
                    found = True
        if not found:
            raise ValueError(f"{obj!r} declares no QMP command")

    def update(self, other: CommandTable) -> None:
        """Add all commands of ``other``."""
        for cmd in other._commands.values():
            self._add(cmd)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __len__(self) -> int:
        return len(self._commands)

    def __getitem__(self, name: str) -> Command:
        return self._commands[name]

    def names(self) -> list[str]:
        """Command names in registration order."""
        return list(self._commands)

    async def dispatch(self, request: Request) -> Return | ErrorReply:
        """Validate and execute ``request``; always returns a reply.

        The reply carries the request's id.  Unknown command: CommandNotFound
        "The command X has not been found".  Bad arguments: GenericError in
        QEMU's words, and the handler is not called.  A handler raising
        :class:`QMPError` gives that error; any other ``Exception`` is logged
        and reported as GenericError with ``str(exc)``.  ``BaseException``
        (``trio.Cancelled``, ``KeyboardInterrupt``) propagates untouched.
        """
        cmd = self._commands.get(request.command)
        if cmd is None:
            return request.error(
                ErrorClass.COMMAND_NOT_FOUND, f"The command {request.command} has not been found"
            )
        try:
            kwargs = cmd.args.to_kwargs(request.arguments)
            result = cmd.handler(**kwargs)
            if inspect.isawaitable(result):
                result = await result
        except QMPError as exc:
            return request.error(exc.error_class, exc.desc)
        except Exception as exc:
            logger.exception("QMP command %s failed", request.command)
            return request.error(ErrorClass.GENERIC_ERROR, str(exc) or type(exc).__name__)
        return request.reply(result)
