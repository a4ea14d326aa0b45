"""Argument signatures: bind a call's positional and keyword arguments to named parameters,
check their types and ranges, and print them back canonically. Layers, optimizers, schedules,
data sources and initialisers all declare their arguments with `P` and are bound here, so every
one of them reports a bad argument the same way (Keras style: `Received: units=0`)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import FlowError, did_you_mean
from .parse import Call, List, Name, Number, Shape, String

REQUIRED = object()
MAX_INT = 2**31 - 1     # sizes, counts and dimensions beyond this are typos, and would overflow sums
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ArgError(Exception):
    """Raised by a checker; the binder adds position and context."""


@dataclass(frozen=True)
class P:
    """One parameter. kind: int, float, bool, shape, str, name, layer, pad, extent (pixels or a
    fraction of a side), act, call, calls, any.
    'layer' is a reference to a layer of the network by name (resolved when the model is built)."""
    name: str
    kind: str
    default: object = REQUIRED
    lo: float | None = None          # inclusive lower bound
    hi: float | None = None          # inclusive upper bound
    lo_open: bool = False            # lower bound exclusive
    hi_open: bool = False
    choices: tuple = ()              # for kind 'name'
    positional: bool = True
    table: object = None             # for 'call'/'calls': dict name -> tuple of P (or callable returning it)
    rest: bool = False               # takes every remaining positional argument (a tuple), e.g. concat(a, b, c)

    @property
    def required(self):
        return self.default is REQUIRED


@dataclass(frozen=True)
class CallValue:
    """A validated call such as adam(lr=0.001, beta1=0.9, beta2=0.999)."""
    name: str
    args: tuple  # ((key, python value), ...) in signature order, defaults filled in

    def get(self, key, default=None):
        for k, v in self.args:
            if k == key:
                return v
        return default

    def __getitem__(self, key):
        for k, v in self.args:
            if k == key:
                return v
        raise KeyError(key)

    def __str__(self):
        shown = [(k, v) for k, v in self.args if v is not None]  # None: an unset optional argument
        if not shown:
            return self.name
        return f"{self.name}({', '.join(f'{k}={fmt(v)}' for k, v in shown)})"


def fmt(v) -> str:
    """Canonical .flow text of a python value produced by the binder."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e15:
            return str(int(v)) if abs(v) >= 1 or v == 0 else repr(v)
        return repr(v)
    if isinstance(v, Quoted):  # before str: Quoted is a str
        return ("'" + v + "'") if '"' in v else '"' + v + '"'
    if isinstance(v, str):
        return v if _NAME.fullmatch(v) else '"' + v + '"'
    if isinstance(v, ShapeValue):
        return v.text
    if isinstance(v, tuple):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


class Quoted(str):
    """A string argument (written in quotes), as opposed to a bare name."""


class ShapeValue(tuple):
    """Dims as written (W, H, C) or (N,)."""

    @property
    def text(self):
        return "x".join(str(d) for d in self)


def _received(key, node) -> str:
    return f"Received: {key}={_src(node)}"


def _src(node) -> str:
    if isinstance(node, Number):
        return node.text
    if isinstance(node, Shape):
        return node.text
    if isinstance(node, String):
        return '"' + node.value + '"'
    if isinstance(node, Name):
        return node.name
    if isinstance(node, Call):
        inner = ", ".join((f"{a.key}=" if a.key else "") + _src(a.value) for a in node.args)
        return f"{node.name}({inner})"
    if isinstance(node, List):
        return "[" + ", ".join(_src(x) for x in node.items) + "]"
    return str(node)


def _range_text(p: P) -> str:
    parts = []
    if p.lo is not None:
        parts.append(("> " if p.lo_open else ">= ") + fmt(p.lo))
    if p.hi is not None:
        parts.append(("< " if p.hi_open else "<= ") + fmt(p.hi))
    return " and ".join(parts)


def convert(p: P, node, what: str):
    """Check one value node against parameter p; return the python value or raise ArgError."""
    k = p.kind
    if k == "any":
        return node
    if k in ("int", "float"):
        if not isinstance(node, Number):
            raise ArgError(f"{p.name} must be a {'whole ' if k == 'int' else ''}number")
        v = node.value
        if k == "int":
            if isinstance(v, float):
                if not math.isfinite(v) or v != int(v):
                    raise ArgError(f"{p.name} must be a whole number")
                v = int(v)
            if abs(v) > MAX_INT and (p.hi is None or p.hi > MAX_INT):
                raise ArgError(f"{p.name} must be at most {MAX_INT}")
        else:
            try:
                v = float(v) + 0.0  # -0.0 -> 0.0: one value, one spelling
            except OverflowError:  # an integer literal beyond float range (1000...0)
                raise ArgError(f"{p.name} must be a finite number") from None
            if not math.isfinite(v):
                raise ArgError(f"{p.name} must be a finite number")
        if (p.lo is not None and (v < p.lo or (p.lo_open and v == p.lo))) or \
           (p.hi is not None and (v > p.hi or (p.hi_open and v == p.hi))):
            raise ArgError(f"{p.name} must be {_range_text(p)}")
        return v
    if k == "extent":  # pixels (a whole number >= 1) or a fraction of the image side (0 < f < 1)
        if not isinstance(node, Number) or (isinstance(node.value, float) and not math.isfinite(node.value)):
            raise ArgError(f"{p.name} must be a number of pixels or a fraction of the image side")
        v = node.value   # an int may be beyond float range (1000...0): compared as an int below
        if 0 < v < 1:
            return float(v)
        if v >= 1 and v == int(v):
            if v > MAX_INT:
                raise ArgError(f"{p.name} must be at most {MAX_INT}")
            return int(v)
        raise ArgError(f"{p.name} must be a whole number of pixels (>= 1) or a fraction of the image side "
                       f"between 0 and 1, e.g. 0.1 for up to 10%")
    if k == "bool":
        if isinstance(node, Name) and node.name in ("true", "false"):
            return node.name == "true"
        raise ArgError(f"{p.name} must be true or false")
    if k == "shape":
        if isinstance(node, Shape):
            dims = node.dims
        elif isinstance(node, Number) and isinstance(node.value, int):
            dims = (node.value,)
        else:
            raise ArgError(f"{p.name} must be a shape such as 28x28x1 (width x height x channels) or a size such as 784")
        if any(d < 1 for d in dims):
            raise ArgError(f"{p.name}: every dimension must be at least 1")
        if any(d > MAX_INT for d in dims):
            raise ArgError(f"{p.name}: every dimension must be at most {MAX_INT}")
        return ShapeValue(dims)
    if k == "str":
        if isinstance(node, String):
            return Quoted(node.value)
        raise ArgError(f"{p.name} must be a quoted string")
    if k == "name":  # one of a few words, written bare or quoted
        got = node.name if isinstance(node, Name) else node.value if isinstance(node, String) else None
        if got in p.choices:
            return got
        hint = did_you_mean(got, p.choices) if got else ""
        raise ArgError(f"{p.name} must be one of {', '.join(p.choices)}{hint}")
    if k == "layer":  # a layer's name, written bare (or quoted); the model resolves it
        if isinstance(node, Name) and node.name not in ("true", "false", "same"):
            return node.name
        if isinstance(node, String) and _NAME.fullmatch(node.value):
            return node.value
        raise ArgError(f"{p.name} must be the name of an earlier layer, such as a bound name")
    if k == "pad":
        if isinstance(node, Name) and node.name == "same":
            return "same"
        if isinstance(node, Number) and node.value == int(node.value) and node.value >= 0:
            if node.value > MAX_INT:
                raise ArgError(f"{p.name} must be at most {MAX_INT}")
            return int(node.value)
        raise ArgError(f"{p.name} must be a whole number >= 0 or same")
    if k == "call":
        return bind_call(node, p.table() if callable(p.table) else p.table, what=p.name)
    if k == "calls":  # a list of calls, or a single one
        items = node.items if isinstance(node, List) else (node,)
        table = p.table() if callable(p.table) else p.table
        return tuple(bind_call(x, table, what=p.name) for x in items)
    raise AssertionError(k)


def bind_call(node, table: dict, what: str) -> CallValue:
    """Bind a Name or Call against a table {name: params}. Raises FlowError with a position."""
    if isinstance(node, Name):
        name, args, pos = node.name, (), node.pos
    elif isinstance(node, Call):
        name, args, pos = node.name, node.args, node.pos
    else:
        raise FlowError(f"{what} must be one of {', '.join(sorted(table))}. {_received(what, node)}",
                        line=node.pos.line, column=node.pos.column)
    if name not in table:
        raise FlowError(f"unknown {what} '{name}'{did_you_mean(name, table)} "
                        f"(choose from {', '.join(sorted(table))})", line=pos.line, column=pos.column)
    values = bind(name, table[name], args, pos, what=name)
    return CallValue(name, tuple(values.items()))


def bind(owner: str, params, args, pos, what=None, where: dict | None = None) -> dict:
    """Bind parsed Args to params (in order). Returns {name: value} with defaults filled in.
    If `where` is given it receives {name: position of the value} for the arguments written."""
    params = tuple(params)
    by_name = {p.name: p for p in params}
    out, given = {}, {}
    positional = [p for p in params if p.positional]
    pi = 0
    for a in args:
        if a.key is None:
            while pi < len(positional) and ((positional[pi].name in given and not positional[pi].rest) or
                                            (positional[pi].kind == "shape" and not positional[pi].required
                                             and not isinstance(a.value, Shape))):
                pi += 1
            if pi >= len(positional):
                names = ", ".join(p.name for p in positional) or "none"
                raise FlowError(f"{owner}: too many positional arguments (it takes: {names}). "
                                f"Received: {_src(a.value)}", line=a.pos.line, column=a.pos.column)
            p = positional[pi]
            if p.rest:   # every remaining positional argument
                try:
                    item = convert(p, a.value, owner)
                except ArgError as e:
                    raise FlowError(f"{owner}: {e}. {_received(p.name, a.value)}",
                                    line=a.value.pos.line, column=a.value.pos.column) from None
                out[p.name] = out.get(p.name, ()) + (item,)
                given.setdefault(p.name, a)
                if where is not None:
                    where.setdefault(p.name, a.value.pos)
                continue
            pi += 1
        else:
            if a.key not in by_name:
                known = ", ".join(p.name for p in params) or "no arguments"
                raise FlowError(f"{owner}: unknown argument '{a.key}'{did_you_mean(a.key, by_name)} "
                                f"(it takes: {known})", line=a.pos.line, column=a.pos.column)
            p = by_name[a.key]
            if p.name in given:
                raise FlowError(f"{owner}: argument '{p.name}' given twice", line=a.pos.line, column=a.pos.column)
        try:
            if p.rest:   # written as a keyword: a list, or one value
                items = a.value.items if isinstance(a.value, List) else (a.value,)
                out[p.name] = tuple(convert(p, v, owner) for v in items)
            else:
                out[p.name] = convert(p, a.value, owner)
        except ArgError as e:
            raise FlowError(f"{owner}: {e}. {_received(p.name, a.value)}",
                            line=a.value.pos.line, column=a.value.pos.column) from None
        given[p.name] = a
        if where is not None:
            where[p.name] = a.value.pos
    for p in params:
        if p.name not in out:
            if p.required:
                raise FlowError(f"{owner}: missing argument '{p.name}'", line=pos.line, column=pos.column)
            out[p.name] = p.default
            if p.kind == "str" and isinstance(p.default, str):
                out[p.name] = Quoted(p.default)  # printed back in quotes, as it must be written
            if p.kind == "call" and isinstance(p.default, str):
                table = p.table() if callable(p.table) else p.table
                out[p.name] = CallValue(p.default, tuple(bind(p.default, table[p.default], (), pos).items()))
    # keep signature order
    return {p.name: out[p.name] for p in params}
