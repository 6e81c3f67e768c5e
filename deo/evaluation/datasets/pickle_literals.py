"""Read the literal values out of a pickle without unpickling it.

GEO-Bench keeps each sample's classification label inside a pickled dict stored as an HDF5
attribute. Unpickling a downloaded file hands its author the interpreter, so this module never
calls ``pickle.load``: it walks the opcode stream with ``pickletools.genops`` (a disassembler,
which executes nothing) and rebuilds only plain data — numbers, strings, bytes, lists, tuples,
dicts, sets. References to classes or functions become inert ``Opaque`` records that are never
imported or called. Two such records are understood as data because their meaning is fixed by
numpy's documented pickle format: arrays (``_reconstruct`` + state, or ``_frombuffer``) and
scalars (``scalar``), rebuilt with ``np.frombuffer`` for plain numeric dtypes only.
"""

from __future__ import annotations

import ast
import pickletools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_MARK = object()
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric")
_NUMPY_MODULES += ("numpy._core.numeric",)
_NUMERIC_KINDS = "biuf"


class PickleLiteralError(ValueError):
    """The stream uses an opcode that plain data never needs, or has an unexpected shape."""


@dataclass(frozen=True)
class Global:
    """A class or function the pickle names; recorded, never imported."""

    module: str
    name: str


@dataclass(eq=False)
class Opaque:
    """A call the pickle would make (``callee(*args)``, then ``__setstate__(state)``)."""

    callee: Any
    args: tuple[Any, ...]
    state: Any = field(default=None)


def _pop_mark(stack: list[Any]) -> list[Any]:
    for k in range(len(stack) - 1, -1, -1):
        if stack[k] is _MARK:
            items = stack[k + 1 :]
            del stack[k:]
            return items
    raise PickleLiteralError("MARK expected on the stack")


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    return [(items[k], items[k + 1]) for k in range(0, len(items), 2)]


_PUSH_ARG = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
}  # fmt: skip
_PUSH_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_IGNORED = {"PROTO", "FRAME", "STOP"}


def _apply(name: str, arg: Any, stack: list[Any], memo: dict[int, Any]) -> None:
    """Apply one data opcode to ``stack``; PickleLiteralError for anything else."""
    if name in _PUSH_ARG:
        stack.append(arg)
    elif name in _PUSH_CONST:
        stack.append(_PUSH_CONST[name])
    elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
        stack.append(arg.encode("latin-1") if isinstance(arg, str) else arg)
    elif name == "BYTEARRAY8":
        stack.append(bytes(arg))
    elif name == "MARK":
        stack.append(_MARK)
    elif name == "EMPTY_LIST":
        stack.append([])
    elif name == "EMPTY_DICT":
        stack.append({})
    elif name == "EMPTY_TUPLE":
        stack.append(())
    elif name == "EMPTY_SET":
        stack.append(set())
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        n = int(name[-1])
        items = tuple(stack[-n:])
        del stack[-n:]
        stack.append(items)
    elif name == "TUPLE":
        stack.append(tuple(_pop_mark(stack)))
    elif name == "LIST":
        stack.append(_pop_mark(stack))
    elif name == "DICT":
        items = _pop_mark(stack)
        stack.append(dict(_pairs(items)))
    elif name == "FROZENSET":
        stack.append(frozenset(_pop_mark(stack)))
    elif name == "APPEND":
        value = stack.pop()
        stack[-1].append(value)
    elif name == "APPENDS":
        items = _pop_mark(stack)
        stack[-1].extend(items)
    elif name == "ADDITEMS":
        items = _pop_mark(stack)
        stack[-1].update(items)
    elif name == "SETITEM":
        value, key = stack.pop(), stack.pop()
        stack[-1][key] = value
    elif name == "SETITEMS":
        items = _pop_mark(stack)
        stack[-1].update(_pairs(items))
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[int(arg)] = stack[-1]
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[int(arg)])
    elif name == "POP":
        stack.pop()
    elif name == "POP_MARK":
        _pop_mark(stack)
    elif name == "DUP":
        stack.append(stack[-1])
    elif name == "GLOBAL":
        module, _, attr = str(arg).partition(" ")
        stack.append(Global(module, attr))
    elif name == "STACK_GLOBAL":
        attr, module = stack.pop(), stack.pop()
        stack.append(Global(str(module), str(attr)))
    elif name in ("REDUCE", "NEWOBJ"):
        args = stack.pop()
        stack.append(Opaque(stack.pop(), tuple(args)))
    elif name == "NEWOBJ_EX":
        stack.pop()  # keyword arguments: not needed to describe the object
        args = stack.pop()
        stack.append(Opaque(stack.pop(), tuple(args)))
    elif name == "BUILD":
        state = stack.pop()
        if not isinstance(stack[-1], Opaque):
            raise PickleLiteralError("BUILD on a plain value")
        stack[-1].state = state
    elif name not in _IGNORED:
        raise PickleLiteralError(f"opcode {name} is not plain data")


def read_literals(data: bytes) -> Any:
    """The value a pickle describes, with classes and calls left as ``Opaque`` records."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            _apply(opcode.name, arg, stack, memo)
    except (IndexError, KeyError, AttributeError, TypeError) as exc:
        raise PickleLiteralError(f"malformed pickle: {exc!r}") from exc
    if len(stack) != 1:
        raise PickleLiteralError(f"pickle left {len(stack)} values on the stack")
    return stack[0]


def read_repr_literals(text: str) -> Any:
    """``read_literals`` of a pickle stored as the ``repr`` of its bytes (GEO-Bench's attrs)."""
    raw = ast.literal_eval(text)
    if not isinstance(raw, bytes):
        raise PickleLiteralError("attribute is not a bytes literal")
    return read_literals(raw)


def _dtype(value: Any) -> np.dtype:
    """A plain numeric dtype from numpy's pickled ``dtype(code, align, copy)`` + state."""
    if not (isinstance(value, Opaque) and value.callee == Global("numpy", "dtype")):
        raise PickleLiteralError(f"not a pickled dtype: {value!r}")
    code = value.args[0]
    order = value.state[1] if isinstance(value.state, tuple) and len(value.state) > 1 else "|"
    dtype = np.dtype(code).newbyteorder(order if order in "<>" else "=")
    if dtype.kind not in _NUMERIC_KINDS:
        raise PickleLiteralError(f"dtype {dtype} is not plain numeric")
    return dtype


def _bytes(value: Any) -> bytes:
    """Raw bytes, also from protocol 0–2's ``_codecs.encode(text, "latin1")`` form."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if (
        isinstance(value, Opaque)
        and value.callee == Global("_codecs", "encode")
        and len(value.args) == 2
        and isinstance(value.args[0], str)
        and value.args[1] == "latin1"
    ):
        return value.args[0].encode("latin-1")
    raise PickleLiteralError(f"not a byte string: {value!r}")


def to_plain(value: Any) -> Any:
    """Turn numpy arrays and scalars described by ``Opaque`` records into numpy values.

    Anything else that is opaque raises PickleLiteralError: the caller asked for data.
    """
    if not isinstance(value, Opaque):
        return value
    callee = value.callee
    if not (isinstance(callee, Global) and callee.module in _NUMPY_MODULES):
        raise PickleLiteralError(f"{callee!r} is not plain data")
    if callee.name == "_reconstruct":
        _version, shape, dtype, fortran, raw = value.state
        array = np.frombuffer(_bytes(raw), dtype=_dtype(dtype))
        return array.reshape(shape, order="F" if fortran else "C").copy()
    if callee.name == "_frombuffer":
        raw, dtype, shape, order = value.args
        return np.frombuffer(_bytes(raw), dtype=_dtype(dtype)).reshape(shape, order=order).copy()
    if callee.name == "scalar":
        dtype, raw = value.args
        return np.frombuffer(_bytes(raw), dtype=_dtype(dtype))[0]
    raise PickleLiteralError(f"{callee!r} is not plain data")
