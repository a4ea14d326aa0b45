"""Text -> syntax tree of frozen dataclasses, each with its line and column.

Pure Python (lark only): `flowdsl check` never imports numpy or numba through this module.
One concern over ~500 lines: the syntax tree's dataclasses, the lark transformer that builds
them, and the table of known mistakes that turns lark's errors into positioned messages belong
together (each error example names the tree it expects); splitting them would spread the
grammar's knowledge over files.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Union

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from .errors import FlowError

MAX_DEPTH = 128  # brackets nested deeper than this are refused before parsing


# ----------------------------------------------------------------------------- syntax tree
@dataclass(frozen=True)
class Pos:
    line: int
    column: int


@dataclass(frozen=True)
class Number:
    value: Union[int, float]
    text: str
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Shape:
    dims: tuple  # as written: (W, H, C) or (N,)
    pos: Pos = field(compare=False)

    @property
    def text(self):
        return "x".join(str(d) for d in self.dims)


@dataclass(frozen=True)
class String:
    value: str
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Name:
    name: str
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Arg:
    key: Union[str, None]
    value: "Value"
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple  # of Arg
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class List:
    items: tuple
    pos: Pos = field(compare=False)


Value = Union[Number, Shape, String, Name, Call, List]


@dataclass(frozen=True)
class Chain:
    elements: tuple  # of Name (a bound name or a zero-argument layer) or Call (a layer)
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Binding:
    name: str
    chain: Chain
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Setting:
    key: str
    value: Value
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Block:
    name: str
    settings: tuple
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Program:
    statements: tuple
    source: str = field(compare=False, repr=False)
    file: Union[str, None] = field(compare=False, default=None)


# ----------------------------------------------------------------------------- the parser
def _grammar_text() -> str:
    # In a wheel the grammar is packaged as flowdsl/grammar/flow.lark; in a source checkout it
    # lives at the top level beside the package.
    try:
        return resources.files("flowdsl").joinpath("grammar/flow.lark").read_text("utf-8")
    except (FileNotFoundError, NotADirectoryError, OSError):
        pass
    return (Path(__file__).resolve().parent.parent / "grammar" / "flow.lark").read_text("utf-8")


class _Postlex:
    """Drop a newline inside brackets or next to `::`, so that lists and chains may span lines."""

    always_accept = ()

    def process(self, stream):
        depth = 0
        prev = None
        pending = None  # a newline held back until we see whether `::` follows
        for tok in stream:
            v = tok.value if tok.type != "_NL" else None
            if tok.type == "_NL":
                if depth > 0 or (prev is not None and prev.value == "::"):
                    continue
                if pending is None:
                    pending = tok
                continue
            if pending is not None:
                if v != "::":
                    yield pending
                pending = None
            if v in ("(", "["):
                depth += 1
            elif v in (")", "]") and depth > 0:
                depth -= 1
            prev = tok
            yield tok
        if pending is not None:
            yield pending


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(_grammar_text(), parser="lalr", lexer="basic", postlex=_Postlex(),
                propagate_positions=False, maybe_placeholders=False,  # tokens carry positions
                cache=_cache_file() or False)


def _cache_file():
    """Where lark keeps the built parser between runs: building it costs a quarter of a second
    (most of `flowdsl check`), loading it a few milliseconds. Lark checks the grammar's hash and
    its own version on load and rebuilds (and rewrites) a stale or broken file. None: no cache
    (FLOWDSL_NO_USER_CACHE=1, or no writable user cache directory)."""
    if os.environ.get("FLOWDSL_NO_USER_CACHE") == "1":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = os.path.join(base, "flowdsl")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError:
        return None
    if not os.access(d, os.W_OK):
        return None
    import lark
    return os.path.join(d, f"parser-lark{lark.__version__}.cache")


def _pos(x) -> Pos:
    return Pos(x.line, x.column)


@v_args(meta=True)
class _ToAst(Transformer):
    def start(self, meta, items):
        return tuple(items)

    def binding(self, meta, items):
        name, chain = items
        return Binding(str(name), chain, _pos(name))

    def block(self, meta, items):
        name, *settings = items
        return Block(str(name), tuple(settings), _pos(name))

    def setting(self, meta, items):
        key, value = items
        return Setting(str(key), value, _pos(key))

    def chain(self, meta, items):
        return Chain(tuple(items), items[0].pos)

    def ref(self, meta, items):
        (name,) = items
        return Name(str(name), _pos(name))

    def call(self, meta, items):
        name, *args = items
        return Call(str(name), tuple(args), _pos(name))

    vcall = call

    def positional(self, meta, items):
        (value,) = items
        return Arg(None, value, value.pos)

    def keyword(self, meta, items):
        key, value = items
        return Arg(str(key), value, _pos(key))

    def number(self, meta, items):
        (tok,) = items
        text = str(tok)
        try:
            value = int(text)
        except ValueError:
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise FlowError(f"number out of range: {text}", line=tok.line, column=tok.column)
        return Number(value, text, _pos(tok))

    def shape(self, meta, items):
        (tok,) = items
        return Shape(tuple(int(d) for d in str(tok).split("x")), _pos(tok))

    def string(self, meta, items):
        (tok,) = items
        return String(str(tok)[1:-1], _pos(tok))

    def name(self, meta, items):
        (tok,) = items
        return Name(str(tok), _pos(tok))

    def vlist(self, meta, items):
        bracket, *values = items
        return List(tuple(values), _pos(bracket))


def _describe(tok) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "NAME":
        return f"name '{tok.value}'"
    if tok.type in ("NUMBER", "SHAPE", "STRING"):
        return f"{tok.type.lower()} {tok.value}"
    return f"'{tok.value}'"


# ----------------------------------------------------------------------------- syntax diagnosis
# A syntax error is explained from what the parser saw: the tokens before the bad one (which
# brackets are open, what came just before) and the set of tokens it would have accepted. This is
# deterministic, unlike matching against example errors by LALR state, which labels every error in
# a shared state with the first example's wording (`x = 3` read as a dangling '::').
_CLOSER = {"(": ")", "[": "]", "{": "}"}


def _is_value_start(tok) -> bool:
    return tok.type in ("NAME", "NUMBER", "SHAPE", "STRING") or tok.value == "["


@functools.lru_cache(maxsize=1)
def _lexer():
    # Built once: Lark.lex() would build (and collision-check) a fresh lexer on every call.
    from lark.lexer import BasicLexer
    return BasicLexer(_parser().lexer_conf)


def _lex(text: str):
    from lark.lexer import LexerThread
    return _Postlex().process(LexerThread.from_text(_lexer(), text).lex(None))


def _tokens_before(text: str, stop):
    """The postlexed tokens that start before offset `stop` (all of them when stop is None)."""
    toks = []
    try:
        for t in _lex(text):
            if stop is not None and t.start_pos is not None and t.start_pos >= stop:
                break
            toks.append(t)
    except Exception:  # a bad character after the error: the tokens so far are enough
        pass
    return toks


def _diagnose(e: UnexpectedToken, text: str):
    """(message, line, column) for a token the parser did not expect."""
    tok = e.token
    at_end = tok.type == "$END"
    toks = _tokens_before(text, None if at_end else tok.start_pos)
    stack = []
    for t in toks:
        if t.value in _CLOSER and t.type != "STRING":
            stack.append(t)
        elif t.value in (")", "]", "}") and stack and _CLOSER[stack[-1].value] == t.value:
            stack.pop()
    prev = next((t for t in reversed(toks) if not (at_end and t.type == "_NL")), None)
    if at_end:
        if prev is not None:
            line, col = prev.end_line, prev.end_column
        else:
            p = _end_position(text)
            line, col = p.line, p.column
    else:
        line, col = tok.line, tok.column
    found = _describe(tok)
    try:
        accepts = set(e.accepts or e.expected or ())
    except Exception:
        accepts = set(e.expected or ())
    pv = prev.value if prev is not None and prev.type != "_NL" else None
    fv = None if at_end or tok.type == "_NL" else tok.value
    open_ = stack[-1] if stack else None

    def opened():
        return f"the '{open_.value}' at {open_.line}:{open_.column}"

    label = None
    if open_ is not None and open_.value in "([":
        closer = _CLOSER[open_.value]
        between = "arguments" if open_.value == "(" else "list items"
        if pv == "=" and not _is_value_start(tok):
            label = "a value is missing after '='"
        elif at_end or fv in ("::", "{", "}") or fv in (")", "]") and fv != closer:
            label = f"missing '{closer}' to close {opened()}"
        elif _is_value_start(tok) and "COMMA" in accepts:
            if prev is not None and tok.line > prev.end_line:
                # the argument list was probably meant to end on the line before
                label = f"missing '{closer}' to close {opened()}, or ',' between {between}"
                line, col = prev.end_line, prev.end_column
            else:
                label = f"missing ',' between {between}"
    elif open_ is not None:  # inside a block
        if pv == "=" and not _is_value_start(tok):
            label = "a value is missing after '='"
        elif at_end:
            label = f"unclosed '{{' (add '}}' at the end of the block; {opened()} is not closed)"
        elif "EQUAL" in accepts and fv != "=":
            label = "missing '=' (write `name = value`)"
        elif fv == "::":
            label = "a chain ('::') cannot be a setting's value"
            if tok.line > open_.line:
                label += f" (is {opened()} closed?)"
    else:  # statement level
        before = toks[-2] if len(toks) >= 2 else None
        if (fv in ("=", "{") and prev is not None and prev.type == "NAME" and before is not None
                and before.value == "::" and prev.line > before.end_line):
            # `a :: b ::` ending a line joins the next line to the chain
            label = "dangling '::' at the end of a line (a layer must follow it)"
            line, col = before.line, before.column
        elif pv == "::":
            label = "dangling '::' (a layer must follow it)"
        elif fv == "::":
            label = "dangling '::' (a layer must come before it)"
        elif pv == "=":
            label = ("a value is missing after '='" if at_end or tok.type == "_NL"
                     else "expected a layer or a chain after '=', such as `x = dense(10)`")
        elif "EQUAL" in accepts and _is_value_start(tok):
            label = "missing '=' (write `name = layer`) or '::' (between layers)"
        elif _is_value_start(tok) and pv is not None and (pv == ")" or prev.type == "NAME"):
            label = "missing '::' between layers"
        elif fv in (")", "]", "}"):
            label = f"unmatched '{fv}'"
    if label:
        return f"{label}; found {found}", line, col
    expected = sorted({f for f in (_friendly(t) for t in accepts) if f})
    msg = f"unexpected {found}"
    if expected:
        msg += "; expected " + ", ".join(expected[:6])
    return msg, line, col


def _visible_column(text: str, line, col):
    """A column at most one past the line's last character: an end of line found after a
    '\r' (Windows line endings) is shown just after the text, not past the invisible '\r'."""
    if line is None or col is None:
        return col
    lines = text.split("\n")
    if 1 <= line <= len(lines):
        return min(col, len(lines[line - 1].rstrip("\r")) + 1)
    return col


def _end_position(text: str) -> Pos:
    lines = [l.rstrip("\r") for l in text.split("\n")]  # only '\n' ends a line, as for lark
    # the last line that holds something other than blanks or a comment
    for i in range(len(lines) - 1, -1, -1):
        s = lines[i].split("#", 1)[0].rstrip()
        if s:
            return Pos(i + 1, len(s) + 1)
    return Pos(1, 1)


def _check_depth(text: str, file):
    depth = 0
    line, col = 1, 0
    in_str = in_comment = None
    for ch in text:
        col += 1
        if ch == "\n":
            line, col = line + 1, 0
            in_str = in_comment = None
            continue
        if in_str:
            if ch == in_str:
                in_str = None
            continue
        if in_comment:
            continue
        if ch == "#":
            in_comment = True
        elif ch in "\"'":
            in_str = ch
        elif ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise FlowError(f"brackets nested more than {MAX_DEPTH} deep", file, line, col, text)
        elif ch in ")]}":
            depth = max(0, depth - 1)


def parse_text(text: str, file: str | None = None) -> Program:
    """Parse .flow source into a Program. Raises FlowError, never anything else."""
    if not isinstance(text, str):
        raise FlowError(f"expected .flow source text, got {type(text).__name__}", file)
    if text.startswith("\ufeff"):  # a byte-order mark, as read_source() drops it from files
        text = text[1:]
    _check_depth(text, file)
    try:
        tree = _parser().parse(text)
    except UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if e.pos_in_stream is not None and e.pos_in_stream < len(text) else "?"
        shown = repr(ch)[1:-1] if ch.isprintable() else f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"U+{ord(ch):04X}"
        raise FlowError(f"unexpected character '{shown}'", file, e.line, e.column, text) from None
    except UnexpectedToken as e:
        try:
            msg, line, col = _diagnose(e, text)
        except Exception:  # explaining an error must never turn it into a crash
            msg, line, col = f"unexpected {_describe(e.token)}", e.line, e.column
            if e.token.type == "$END":
                p = _end_position(text)
                line, col = p.line, p.column
        raise FlowError(msg, file, line, _visible_column(text, line, col), text) from None
    except UnexpectedInput as e:
        raise FlowError("syntax error", file, getattr(e, "line", None), getattr(e, "column", None), text) from None
    try:
        stmts = _ToAst().transform(tree)
    except VisitError as e:
        orig = e.orig_exc
        if isinstance(orig, FlowError):
            raise orig.at(file, text) from None
        raise FlowError(f"internal parser error: {orig}", file).at(file, text) from None
    except RecursionError:
        raise FlowError("the file is nested too deeply to read", file, None, None, text) from None
    return Program(stmts, text, file)


_FRIENDLY = {"LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'",
             "RBRACE": "'}'", "EQUAL": "'='", "COMMA": "','", "NAME": "a name", "NUMBER": "a number",
             "SHAPE": "a shape", "STRING": "a string", "_NL": "end of line", "$END": "end of file"}


def _friendly(t: str) -> str | None:
    if t in _FRIENDLY:
        return _FRIENDLY[t]
    if t.startswith("__ANON") or t == "COLON":
        return "'::'"
    return None


def read_source(path) -> str:
    """Read a .flow file, turning I/O and encoding problems into FlowError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FlowError("no such file", str(path)) from None
    except IsADirectoryError:
        raise FlowError("a directory, not a .flow file", str(path)) from None
    except OSError as e:
        raise FlowError(f"cannot read the file: {e.strerror or e}", str(path)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise FlowError(f"not a UTF-8 text file (byte 0x{data[e.start]:02x})", str(path), line, col) from None
    if "\x00" in text:
        i = text.index("\x00")
        line = text.count("\n", 0, i) + 1
        col = i - (text.rfind("\n", 0, i) + 1) + 1
        raise FlowError("binary data in a .flow file (a NUL byte)", str(path), line, col) from None
    return text
