"""Grammar-driven fuzzing of the checker (flowdsl.model.build_text).

tests/test_fuzz.py throws arbitrary text and token soup at the parser. This file generates
GRAMMATICAL programs from the language's own tables: every layer kind and alias in
flowdsl.layers.REGISTRY / ALIASES / CALL_ALIASES with arguments built from its declared
parameters (values of the right type, in and out of range, and of the wrong type), input shapes
from 1-sized to 2**31-1, bindings, and train/init blocks with the real keys of
flowdsl.settings. Then it corrupts some of them (delete, insert or duplicate one token or one
character).

The oracle: build_text either
- accepts, and the layout is right: every layer's input is the previous layer's output, its output
  is what an independent reference of the shape rules says, its parameter count is what the
  reference says, n_params() is an int >= 0, summary() prints, and str(model) parses back to the
  same spec(); or
- raises FlowError (nothing else), which renders as `fuzz.flow:LINE:COL: error: ...` with the
  line and column inside the file.
Each example must finish within PER_EXAMPLE_SECONDS (a hang is a failure, not a slow test).

Examples per test: FLOWDSL_FUZZ_EXAMPLES (default 1000)."""
import math
import os
import re
import signal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flowdsl import layers as registry
from flowdsl.args import MAX_INT, bind
from flowdsl.errors import FlowError
from flowdsl.model import Model, build_text
from flowdsl.parse import Call, parse_text
from flowdsl.settings import INITS, TRAIN

EXAMPLES = int(os.environ.get("FLOWDSL_FUZZ_EXAMPLES", "1000"))
PER_EXAMPLE_SECONDS = 10
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

registry.load_all()
KINDS = sorted(registry.REGISTRY)
ALIASES = sorted(registry.ALIASES)
CALL_ALIASES = sorted(registry.CALL_ALIASES)
LOSSES = sorted(n for n in registry.all_names()
                if (registry.lookup(n, False) or registry.lookup(n, True)).role == "loss")
HUGE = [MAX_INT, MAX_INT + 1, 10**12, 10**40, 10**400]   # the last overflows a float


class Hang(BaseException):
    """Raised by the alarm: a BaseException so that no `except Exception` inside can swallow it."""


def _alarm(signum, frame):
    raise Hang(f"one example ran longer than {PER_EXAMPLE_SECONDS} s")


# ----------------------------------------------------------------------------- value texts
def _table(p):
    return p.table() if callable(p.table) else p.table


def _num_text(draw, v):
    """A number in one of its spellings."""
    if isinstance(v, int) and abs(v) < 10**6 and draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from([f"{v}.0", f"{v}e0", f"+{v}" if v >= 0 else str(v)]))
    if isinstance(v, float):
        return draw(st.sampled_from([repr(v), f"{v:g}", f"{v:e}"]))
    return str(v)


def _in_range_int(draw, p, ok):
    lo = int(p.lo) + (1 if p.lo_open else 0) if p.lo is not None else -5
    hi = int(p.hi) - (1 if p.hi_open else 0) if p.hi is not None else None
    small = st.integers(lo, min(lo + (2 if ok else 6), hi) if hi is not None else lo + (2 if ok else 6))
    if ok or hi is not None:
        return draw(small)
    return draw(st.one_of(small, small, small, st.sampled_from([lo, 1000, MAX_INT]).filter(lambda v: v >= lo)))


def _in_range_float(draw, p):
    lo = p.lo if p.lo is not None else -10.0
    hi = p.hi if p.hi is not None else lo + 10.0
    return draw(st.floats(lo, hi, exclude_min=p.lo_open, exclude_max=p.hi_open, allow_nan=False,
                          allow_infinity=False))


WRONG = st.sampled_from(['"text"', "'x'", "somename", "true", "8x8x1", "[1, 2]", "[]", "adam(lr=1)",
                         "relu", "same", "1.5", "-1", "0", "1e999", "1" + "0" * 400, "-0.0", "2147483648"])


@st.composite
def value_text(draw, p, depth=0, ok=False):
    """Text for parameter p. ok: a right value (of the right type, in range, small); otherwise
    sometimes of the wrong type or out of range."""
    if not ok and draw(st.integers(0, 6)) == 0:
        return draw(WRONG)
    k = p.kind
    if k == "int":
        if not ok and draw(st.integers(0, 4)) == 0:  # out of range or not whole
            bad = [v for v in ((p.lo - 1) if p.lo is not None else None,
                               (p.hi + 1) if p.hi is not None else None) if v is not None]
            return draw(st.sampled_from([_num_text(draw, int(v)) for v in bad] +
                                        ["1.5", "1e-3", str(draw(st.sampled_from(HUGE)))]))
        return _num_text(draw, _in_range_int(draw, p, ok))
    if k == "float":
        if not ok and draw(st.integers(0, 5)) == 0:
            bad = [v for v in ((p.lo - 1) if p.lo is not None else None,
                               (p.hi + 1) if p.hi is not None else None,
                               p.lo if p.lo_open else None, p.hi if p.hi_open else None) if v is not None]
            return draw(st.sampled_from([_num_text(draw, float(v)) for v in bad] +
                                        ["1e999", "-1e999", str(draw(st.sampled_from(HUGE))), "7e-400"]))
        return _num_text(draw, _in_range_float(draw, p))
    if k == "bool":
        return draw(st.sampled_from(["true", "false"] if ok else
                                    ["true", "false", "true", "false", "1", "yes", '"true"']))
    if k == "shape":
        return draw(shape_text(ok))
    if k == "str":
        return draw(st.sampled_from(['"data"', "'d.npz'", '""', '"runs/x"', "'it\"s'", '"a b"'] +
                                    ([] if ok else ["bare"])))
    if k == "name":
        c = draw(st.sampled_from(p.choices + (() if ok else ("nope",))))
        return draw(st.sampled_from([c, f'"{c}"']))
    if k == "layer":  # a reference to another layer: names that often exist, and some that do not
        return draw(st.sampled_from(["input1", "input1", "conv1", "relu1", "dense1", "a", "block", '"input1"'] +
                                    ([] if ok else ["nope", "softmax1", "add1"])))
    if k == "pad":
        if ok:
            return draw(st.sampled_from(["0", "1", "same", "same"]))
        return draw(st.sampled_from(["0", "1", "2", "same", "same", "-1", "1.0", "1.5", '"same"', "valid",
                                     str(MAX_INT), "1" + "0" * 400]))
    if k == "call":
        return draw(call_text(_table(p), depth, ok))
    if k == "calls":
        table = _table(p)
        n = draw(st.integers(0, 3))
        items = [draw(call_text(table, depth, ok)) for _ in range(n)]
        if n == 1 and draw(st.booleans()):
            return items[0]
        return "[" + ", ".join(items) + draw(st.sampled_from(["", ","])) * bool(items) + "]"
    return draw(WRONG)


@st.composite
def call_text(draw, table, depth=0, ok=False):
    name = draw(st.sampled_from(sorted(table) + ([] if ok else ["nope"])))
    params = table.get(name, ())
    if (not params or ok) and draw(st.booleans()) or depth > 1:
        return name
    return name + "(" + draw(arg_list(params, depth + 1, ok)) + ")"


@st.composite
def dims(draw, ok=False):
    if ok:
        return draw(st.one_of(st.integers(1, 40), st.integers(6, 40), st.sampled_from([1, 2, 3, 1000])))
    return draw(st.one_of(st.just(1), st.just(1), st.integers(1, 12), st.integers(1, 12),
                          st.integers(13, 600), st.sampled_from([0, MAX_INT, MAX_INT + 1, 10**30])))


@st.composite
def shape_text(draw, ok=False):
    n = draw(st.sampled_from([3, 3, 3, 1] if ok else [3, 3, 3, 3, 1, 1, 2, 4]))
    ds = [draw(dims(ok)) for _ in range(n)]
    if ok and n == 3:
        ds[2] = draw(st.sampled_from([1, 1, 3, 2, 16]))
    return "x".join(map(str, ds))


@st.composite
def arg_list(draw, params, depth=0, ok=False):
    """Arguments for a signature: positional for a prefix, keywords for the rest, in any order,
    and unless ok, now and then an unknown key, a duplicate or one positional too many."""
    params = list(params)
    chosen = [p for p in params if p.required or draw(st.integers(0, 2)) == 0]
    lead = 0  # positional arguments fill the signature in order: a prefix of it, without gaps
    while lead < len(params) and params[lead] in chosen and params[lead].positional:
        lead += 1
    pos = params[:draw(st.integers(0, lead))]
    if not ok and draw(st.integers(0, 9)) == 0:  # a gap: the value lands on the wrong parameter
        pos = [p for p in chosen if p.positional][:draw(st.integers(0, len(chosen)))]
    kws = [p for p in chosen if p not in pos]
    kws = draw(st.permutations(kws))
    args = [draw(value_text(p, depth, ok)) for p in pos]
    args += [f"{p.name}={draw(value_text(p, depth, ok))}" for p in kws]
    trouble = 99 if ok else draw(st.integers(0, 12))
    if trouble == 0:
        args.append(f"{draw(st.sampled_from(['nope', 'units', 'filters', 'feild', 'act', 'p']))}={draw(WRONG)}")
    elif trouble == 1 and args:
        args.append(args[draw(st.integers(0, len(args) - 1))])
    elif trouble == 2:
        args.append(draw(WRONG))
    sep = draw(st.sampled_from([", ", ",", " , ", ",\n    "]))
    return sep.join(args)


# ----------------------------------------------------------------------------- programs
def _minimal(kind):
    """kind with only its required arguments, each the smallest right value."""
    args = []
    for p in registry.REGISTRY[kind].params:
        if p.required:
            args.append({"int": "1", "float": "0.5", "layer": "input1"}.get(p.kind, "1"))
    return f"{kind}({', '.join(args)})" if args else kind


def _out_after(kind, shape):
    """The output shape of kind after input(shape), or None where it does not take that input."""
    try:
        return build_text(f"input({shape}) :: {_minimal(kind)} :: squared").layers[1].out
    except FlowError:
        return None


# Asked of each kind, not listed by name: a map kind takes an image and gives an image (conv,
# pools, activations; not dense or flatten), a vector kind takes a vector (not conv or the pools).
BODY_KINDS = sorted(k for k, c in registry.REGISTRY.items() if c.role in ("layer", "activation"))
MAP_KINDS = [k for k in BODY_KINDS if len(_out_after(k, "6x6x2") or ()) == 3]
VECTOR_KINDS = [k for k in BODY_KINDS if _out_after(k, "8") is not None]
# layers that can open a network with the input shape as their first argument (conv), by every name
FIRST_LAYERS = sorted(n for n in registry.all_names()
                      if (c := registry.lookup(n, False) or registry.lookup(n, True)).role != "input"
                      and any(p.kind == "shape" for p in c.params))
assert FIRST_LAYERS
# a bridge kind takes a map and gives a vector, and takes no vector (globalavgpool)
BRIDGE_KINDS = [k for k in BODY_KINDS if len(_out_after(k, "6x6x2") or (0, 0)) == 1 and k not in VECTOR_KINDS]
assert set(MAP_KINDS) | set(VECTOR_KINDS) | set(BRIDGE_KINDS) == set(BODY_KINDS), \
    set(BODY_KINDS) - set(MAP_KINDS) - set(VECTOR_KINDS) - set(BRIDGE_KINDS)


@st.composite
def layer_text(draw, first=False, name=None, ok=False):
    if name is None and draw(st.integers(0, 9)) == 0:
        name = draw(st.sampled_from(ALIASES + CALL_ALIASES))
    elif name is None:
        name = draw(st.sampled_from(KINDS))
    cls = registry.lookup(name, True) or registry.lookup(name, False)
    params = [p for p in cls.params
              if first or p.name != "shape" or not ok and draw(st.integers(0, 9)) == 0]
    if first and any(p.name == "shape" for p in params):
        # the input shape, positional, first, most of the time
        rest = [p for p in params if p.name != "shape"]
        inner = draw(arg_list(rest, ok=ok))
        if ok or draw(st.integers(0, 6)):
            return f"{name}({draw(shape_text(ok))}{', ' + inner if inner else ''})"
        return f"{name}({inner})"
    if not params and draw(st.booleans()):
        return name
    if not any(p.required for p in params) and draw(st.integers(0, 3)) == 0:
        return name  # no parentheses: every argument at its default
    return f"{name}({draw(arg_list(params, ok=ok))})"


@st.composite
def chains(draw, ok):
    """A list of layer texts: an input, a body, a loss. ok: in that order, maps before vectors,
    small right values (many still fail shape inference: a field larger than the map, ...)."""
    if ok or draw(st.integers(0, 3)):
        if draw(st.booleans()):
            first = f"input({draw(shape_text(ok))})"
        else:
            first = draw(layer_text(first=True, name=draw(st.sampled_from(FIRST_LAYERS)), ok=ok))
    else:
        first = draw(layer_text(first=True))
    if ok:
        body = draw(st.lists(st.sampled_from(MAP_KINDS).flatmap(lambda k: layer_text(name=k, ok=True)),
                             max_size=4))
        if draw(st.booleans()):
            body.append(draw(st.sampled_from(["flatten", "dense(4)", "fc(8, act=relu)", "linear(3)"] + BRIDGE_KINDS)))
        body += draw(st.lists(st.sampled_from(VECTOR_KINDS).flatmap(lambda k: layer_text(name=k, ok=True)),
                              max_size=3))
    else:
        body = draw(st.lists(layer_text(), max_size=7))
    end = [draw(st.sampled_from(LOSSES))] if ok or draw(st.integers(0, 9)) else []
    if end and (ok or draw(st.integers(0, 3))):
        # classification needs a vector of >= 2 scores: mostly give it one
        body.append(draw(st.sampled_from(["dense(2)", "dense(10)", "linear(3)", "fc(units=2, act=relu)"] +
                                         ([] if ok else ["dense(1)"]))))
    return [first] + body + end


@st.composite
def programs(draw):
    ok = draw(st.booleans())
    chain = draw(chains(ok))
    lines, out, i = [], [], 0
    names = iter(draw(st.permutations(["a", "b", "c0", "block", "head", "x1", "network2", "conv1",
                                       "dense1", "relu"][:None if not ok else 6])))
    bound = []
    while i < len(chain):
        n = draw(st.integers(1, 3)) if draw(st.integers(0, 3)) == 0 else 0
        if n and i + n <= len(chain):
            name = next(names, None)
            if name:
                lines.append(f"{name} = {' :: '.join(chain[i:i + n])}")
                out.append(name)
                bound.append(name)
                i += n
                continue
        out.append(chain[i])
        i += 1
    trouble = 99 if ok else draw(st.integers(0, 15))
    if trouble == 0 and bound:
        out.append(draw(st.sampled_from(bound)))        # used twice
    elif trouble == 1:
        out.insert(draw(st.integers(0, len(out))), "undefined_name")
    sep = draw(st.sampled_from([" :: ", " :: ", "::", " ::\n  ", "\n  :: ", " :: # note\n  "]))
    net = sep.join(out)
    if lines and draw(st.booleans()):
        lines.append(f"network = {net}")
    else:
        lines.append(draw(st.sampled_from([net, f"network = {net}"])))
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(TRAIN), max_size=6, unique_by=(lambda p: p.name) if ok else None))
        if ok and any(p.name == "epochs" for p in keys):
            keys = [p for p in keys if p.name != "iterations"]
        sets = [f"{p.name} = {draw(value_text(p, ok=ok))}" for p in keys]
        if not ok and draw(st.integers(0, 8)) == 0:
            sets.append(f"{draw(st.sampled_from(['epoch', 'lr', 'batchsize', 'nope']))} = 1")
        sep = draw(st.sampled_from(["\n  ", "  ", "\n\n  ", " # c\n  "]))
        lines.append("train {" + sep + sep.join(sets) + "\n}")
    if draw(st.integers(0, 2)) == 0:
        weighted = [n for n in bound if n != "relu"]
        pool = (["default"] + weighted) if ok else \
            bound + ["conv1", "dense1", "dense2", "batchnorm1", "maxpool1", "default", "nope", "softmax1"]
        keys = draw(st.lists(st.sampled_from(pool), max_size=3, unique=ok))
        sets = [f"{k} = {draw(call_text(INITS, ok=ok))}" for k in keys]
        lines.append("init { " + "  ".join(sets) + " }")
    if draw(st.integers(0, 4)) == 0:
        lines = draw(st.permutations(lines))
    head = draw(st.sampled_from(["", "# generated\n", "\n\n", "\ufeff"]))
    nl = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    return head + nl.join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))


TOKENS = re.compile(r"(\s+|::|[()\[\]{}=,]|\"[^\"\n]*\"|'[^'\n]*'|[^\s()\[\]{}=,:]+|:)")
INSERTS = ["::", "(", ")", "[", "]", "{", "}", "=", ",", "\n", " ", "#", '"', "'", "x", "1", "0",
           "1x1x1", "dense", "conv", "softmax", "relu", "input", "network", "train", "init", "same",
           "-", ".", "e", "\t", "\r", "\x00", "é", "\u2028"]


@st.composite
def corrupted(draw):
    text = draw(programs())
    times = draw(st.integers(1, 3))
    for _ in range(times):
        if draw(st.booleans()):  # one token
            toks = [t for t in TOKENS.split(text) if t]
            if not toks:
                toks = [""]
            i = draw(st.integers(0, len(toks) - 1))
            op = draw(st.sampled_from(["delete", "insert", "duplicate"]))
            if op == "delete":
                del toks[i]
            elif op == "duplicate":
                toks.insert(i, toks[i])
            else:
                toks.insert(i, draw(st.sampled_from(INSERTS)))
            text = "".join(toks)
        else:  # one character
            i = draw(st.integers(0, max(0, len(text) - 1)))
            op = draw(st.sampled_from(["delete", "insert", "duplicate"]))
            if op == "delete":
                text = text[:i] + text[i + 1:]
            elif op == "duplicate":
                text = text[:i] + text[i:i + 1] + text[i:]
            else:
                text = text[:i] + draw(st.sampled_from(INSERTS)) + text[i:]
    return text


# ----------------------------------------------------------------------------- the oracle
def reference_out(l, s):
    """The shape rules of README/PRODUCT.md, written independently of the layers' code."""
    a = l.args
    if l.kind == "conv":
        c, h, w = s
        f, st_, p = a["field"], a["stride"], a["pad"]
        if p == "same":
            p = (f - 1) // 2
        assert f <= h + 2 * p and f <= w + 2 * p
        # rounded down, as PyTorch and Keras
        return (a["filters"], math.floor((h + 2 * p - f) / st_) + 1, math.floor((w + 2 * p - f) / st_) + 1)
    if l.kind in ("maxpool", "avgpool", "l2pool"):
        c, h, w = s
        k, st_, p = a["size"], a["stride"], a.get("pad") or 0
        assert k <= h + 2 * p and k <= w + 2 * p and p <= k // 2
        if a["ceil"]:
            o = [math.ceil((n + 2 * p - k) / st_) + 1 for n in (h, w)]
            o = [oi - 1 if (oi - 1) * st_ >= n + p else oi for oi, n in zip(o, (h, w))]
        else:
            o = [(n + 2 * p - k) // st_ + 1 for n in (h, w)]
        return (c, o[0], o[1])
    if l.kind == "globalavgpool":
        assert len(s) == 3
        return (s[0],)
    if l.kind == "concat":
        ins = [s] + [m.out for m in l.inputs()]
        assert len(ins) >= 2 and all(len(t) == len(s) and t[1:] == s[1:] for t in ins)
        return (sum(t[0] for t in ins),) + tuple(s[1:])
    if l.kind == "dense":
        return (a["units"],)
    if l.kind == "flatten":
        return (math.prod(s),)
    if l.kind == "softmax":
        assert len(s) == 1 and s[0] >= 2
    return s


def reference_params(l, s):
    a = l.args
    bias = a.get("bias") is not False
    if l.kind == "conv":
        return a["field"] ** 2 * s[0] * a["filters"] + a["filters"] * bias
    if l.kind == "dense":
        return math.prod(s) * a["units"] + a["units"] * bias
    if l.kind == "batchnorm":
        return 2 * s[0]
    return 0


def check_model(m, text):
    assert isinstance(m, Model)
    shape = m.layers[0].in_shape
    assert len(shape) in (1, 3) and all(isinstance(d, int) and d >= 1 for d in shape)
    for i, l in enumerate(m.layers):
        if l.feed is not None:   # a branch (or a concat that starts a chain) reads an earlier output
            assert m.layers.index(l.feed) < i, (l.name, l.feed.name)
            shape = l.feed.out
        assert l.in_shape == shape, (i, l.name)
        assert l.out == reference_out(l, l.in_shape), (l.name, l.describe(), l.in_shape, l.out)
        assert all(isinstance(d, int) and d >= 1 for d in l.out), (l.name, l.out)
        assert l.n_params(l.in_shape) == reference_params(l, l.in_shape), l.name
        shape = l.out
    assert m.layers[-1].role == "loss" and all(l.role != "loss" for l in m.layers[:-1])
    assert all(l.role != "input" for l in m.layers[1:])
    names = [l.name for l in m.layers]
    assert len(set(names)) == len(names)
    n = m.n_params()
    assert isinstance(n, int) and n >= 0
    assert n == sum(reference_params(l, l.in_shape) for l in m.layers)
    s = m.summary()
    assert "Total:" in s and f"{n:,} weights" in s
    canon = str(m)
    again = build_text(canon, "canonical.flow")
    assert again.spec() == m.spec(), canon
    assert again.n_params() == n
    assert str(again) == canon  # the canonical text is a fixed point


def check_error(e, text):
    out = e.render()
    assert out.startswith("fuzz.flow"), out
    assert "error: " in out and isinstance(e.message, str) and e.message.strip()
    assert "Traceback" not in out
    lines = text.split("\n")  # lines as the parser counts them
    if e.line is None:
        # only an empty program has nothing to point at
        assert "empty" in e.message, (e.message, text)
        return
    assert 1 <= e.line <= len(lines), (e.line, len(lines), e.message)
    assert e.column is not None, e.message
    assert 1 <= e.column <= len(lines[e.line - 1].rstrip("\r")) + 1, (e.line, e.column, e.message, text)
    assert out.count("\n") >= 2, out  # the source line and the caret are shown


def outcome(text):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, PER_EXAMPLE_SECONDS)
    try:
        try:
            m = build_text(text, "fuzz.flow")
        except FlowError as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            check_error(e, text)
            return None
        signal.setitimer(signal.ITIMER_REAL, 0)
        check_model(m, text)
        return m
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@st.composite
def branchy(draw):
    """An Inception-like program: a stem, branches from it (`bi = stem :: ...`), a concat of
    some of them (and maybe the stem) that starts the network or follows a layer, then a head.
    Many fail (unequal map sizes, a branch nothing joins): the error must be positioned."""
    stem = [f"input({draw(st.sampled_from(['6x6x2', '8x5x1', '7x7x3']))})"]
    stem += draw(st.lists(st.sampled_from(MAP_KINDS).flatmap(lambda k: layer_text(name=k, ok=True)), max_size=2))
    lines = [f"stem = {' :: '.join(stem)}"]
    names = []
    for i in range(draw(st.integers(1, 4))):
        body = draw(st.lists(st.sampled_from(MAP_KINDS + ["conv(filters=2, field=1)", "maxpool(3, stride=1, pad=1)"])
                             .flatmap(lambda k: layer_text(name=k, ok=True) if "(" not in k else st.just(k)),
                             min_size=1, max_size=3))
        lines.append(f"b{i} = stem :: {' :: '.join(body)}")
        names.append(f"b{i}")
    joined = draw(st.lists(st.sampled_from(names + ["stem"]), min_size=1, max_size=len(names) + 1, unique=True))
    head = draw(st.sampled_from(["", ":: maxpool(2, ceil=true) ", ":: gap ", ":: relu "]))
    if draw(st.booleans()):
        net = f"network = concat({', '.join(joined)}) {head}:: dense(3) :: softmax"
    else:
        net = f"network = {joined[0]} :: concat({', '.join(joined[1:]) or joined[0]}) {head}:: dense(3) :: softmax"
    return "\n".join(lines + [net]) + "\n"


@FUZZ
@given(programs())
def test_grammatical_programs(text):
    outcome(text)


@FUZZ
@given(branchy())
def test_branchy_programs(text):
    outcome(text)


@FUZZ
@given(corrupted())
def test_corrupted_programs(text):
    outcome(text)


# ----------------------------------------------------------------------------- regressions
@pytest.mark.parametrize("text", [
    "input(4) :: dropout(p=1" + "0" * 400 + ") :: dense(2) :: softmax",         # float() overflow
    "conv(4x4x1, pad=1" + "0" * 400 + ") :: dense(2) :: softmax",               # pad overflow
    "input(4) :: dense(2) :: softmax\ntrain { l2 = 1" + "0" * 400 + " }",
    "input(4) :: leakyrelu(1" + "0" * 400 + ") :: dense(2) :: softmax",
    "input(4) :: dense(2) :: softmax\ninit { default = normal(0, 1" + "0" * 400 + ") }",
    "input(8x8x1) :: dense(2) :: softmax\ntrain { augment = [shift(1" + "0" * 400 + ")] }",  # an extent
])
def test_huge_integers_where_floats_go_are_errors(text):
    with pytest.raises(FlowError) as e:
        build_text(text, "fuzz.flow")
    check_error(e.value, text)


@pytest.mark.parametrize("text,line,column", [
    ("a = input(1) :: dense(2) :: softmax\r\nnetwork = \r\ninit {  }", 2, 11),  # CRLF: not past the '\r'
    ("input(8) :: dense(2) :: softmax\r\ntrain { batch =\r\n}", 2, 16),
])
def test_error_columns_stay_on_the_visible_line(text, line, column):
    with pytest.raises(FlowError) as e:
        build_text(text, "fuzz.flow")
    check_error(e.value, text)
    assert (e.value.line, e.value.column) == (line, column)


@pytest.mark.parametrize("text", [
    "conv(2147483647x2147483647x3, filters=64) :: dense(10) :: softmax",
    "input(1x1x1) :: dense(1) :: squared",
    "conv(1x1x1, field=1) :: flatten :: dense(2) :: softmax",
    "input(2147483647) :: dense(2147483647) :: dense(2) :: softmax",
    "input(20000x20000x3) :: maxpool(2147483647, ceil=true) :: dense(2) :: softmax",
])
def test_extreme_shapes_build_without_allocating(text):
    m = outcome(text)
    if m is not None:
        assert m.n_params() >= 0


def test_huge_strided_conv_is_only_estimated_and_quick():
    """Strides round down now (no search for a fitting pad): a billion-wide field with a stride
    that does not tile builds at once, with its unread border noted, allocating nothing."""
    text = "conv(4x4x1, field=1000000000, pad=600000000, stride=7) :: dense(2) :: softmax"
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 2)
    try:
        m = build_text(text, "fuzz.flow")
        side = (4 + 1_200_000_000 - 1_000_000_000) // 7 + 1
        assert m.layers[0].out == (1, side, side)
        assert "note: conv1: stride 7 does not tile" in m.summary()
    except Hang:
        pytest.fail("building a huge strided conv took more than 2 s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_generators_reach_models():
    """The generator must really produce valid models (else the layout oracle goes untested) and
    use every layer kind."""
    texts = []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(programs())
    def collect(text):
        texts.append(text)

    collect()
    models, kinds = 0, set()
    for t in texts:
        try:
            m = build_text(t)
        except FlowError:
            continue
        models += 1
        kinds |= {l.kind for l in m.layers}
    assert models >= len(texts) // 10, (models, len(texts))
    assert len(kinds) >= len(KINDS) // 2, kinds


def test_examples_budget():
    assert EXAMPLES >= 1000 or "FLOWDSL_FUZZ_EXAMPLES" in os.environ
