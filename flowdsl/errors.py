"""The one error type users see. It renders as `file:line:col: error: message`, then the source
line and a caret under the column, like a compiler."""
from __future__ import annotations


class FlowError(Exception):
    """A problem in a .flow file, its data or its weights.

    `line`/`column` are 1-based; either may be None when there is no position (a missing data
    file, say). `source` is the whole text, used to show the offending line.
    """

    def __init__(self, message, file=None, line=None, column=None, source=None, hint=None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.source = source
        self.hint = hint

    def at(self, file=None, source=None):
        """Fill in the file and source if a lower layer did not know them."""
        if self.file is None:
            self.file = file
        if self.source is None:
            self.source = source
        return self

    def render(self) -> str:
        where = self.file or ("<string>" if self.line is not None else "")
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        out = f"{where}: error: {self.message}" if where else f"error: {self.message}"
        if self.line is not None and self.source is not None:
            # lines as the parser counts them: only '\n' ends a line (splitlines() would also
            # split at '\f', '\x1c', '\u2028', ... and show the wrong line)
            lines = self.source.split("\n")
            if 1 <= self.line <= len(lines):
                text = lines[self.line - 1].rstrip("\r")
                if len(text) > 200:  # a giant line: show a window around the column
                    start = max(0, (self.column or 1) - 100)
                    text_shown = text[start:start + 200]
                    col = (self.column or 1) - start
                else:
                    text_shown, col = text, self.column
                out += "\n    " + text_shown
                if col is not None:
                    pad = "".join(c if c == "\t" else " " for c in text_shown[: col - 1])
                    out += "\n    " + pad + "^"
        if self.hint:
            out += "\n" + self.hint
        return out

    def __str__(self) -> str:
        return self.render()


class UsageError(FlowError):
    """A bad command-line value (the CLI exits 2, as for argparse's own usage errors)."""


def closest(word: str, choices, limit: int | None = None) -> str | None:
    """The choice nearest to `word` by edit distance, if near enough to be a likely typo."""
    word_l = word.lower()
    best, best_d = None, None
    for c in sorted(set(choices)):
        d = _levenshtein(word_l, c.lower())
        if best_d is None or d < best_d:
            best, best_d = c, d
    if best is None:
        return None
    cap = limit if limit is not None else max(1, min(3, len(word) // 3 + 1))
    return best if best_d <= cap and best_d < len(word) else None


def _levenshtein(a: str, b: str) -> int:
    if len(a) > 64 or len(b) > 64:
        return max(len(a), len(b))
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def did_you_mean(word, choices) -> str:
    c = closest(word, choices)
    return f"; did you mean '{c}'?" if c else ""


def size_text(b, digits=1) -> str:
    """A byte count for people: MB, or GB or TB once it is that large (summaries and memory
    errors alike)."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30)):
        if b >= scale:
            return f"{b / scale:,.{digits}f} {unit}"
    return f"{b / 2**20:,.{digits}f} MB"
