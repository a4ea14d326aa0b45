"""Every malformed .flow source gives one FlowError that points at the problem: the right line
and column, a message with the right words, and a rendering `m.flow:LINE:COL: error: ...`
followed by the source line and a caret under the column."""
import pytest

from flowdsl.errors import FlowError
from flowdsl.model import build_text

NET = "input(8) :: dense(2) :: softmax"

# (id, source, line, column, words the message must contain)
CASES = [
    # --- syntax --------------------------------------------------------------------------------
    ("missing-rpar", "conv(28x28x1, field=3 :: dense(2) :: softmax", 1, 23,
     ["missing ')'", "'(' at 1:5", "found '::'"]),
    ("missing-rpar-eof", "input(8) :: dense(2", 1, 20, ["missing ')'", "end of file"]),
    ("missing-rpar-next-line", "network = conv(28x28x1, filters=2\nx = dense(2)", 1, 34,
     ["missing ')'", "','"]),
    ("missing-rsqb", NET + "\ntrain { augment = [hflip }", 2, 26, ["missing ']'", "found '}'"]),
    ("dangling-colons-end", "input(8) :: dense(2) ::", 1, 24, ["dangling '::'", "end of file"]),
    ("dangling-colons-middle", "input(8) :: :: dense(2) :: softmax", 1, 13, ["dangling '::'"]),
    ("dangling-colons-start", ":: input(8) :: dense(2) :: softmax", 1, 1, ["dangling '::'"]),
    ("dangling-colons-end-of-line", "a = input(8) ::\nb = dense(2)\na :: b :: softmax", 1, 14,
     ["dangling '::'", "end of a line"]),
    ("dangling-colons-before-block", "network = input(8) :: dense(2) :: softmax ::\n\ntrain { }", 1, 43,
     ["dangling '::'"]),
    ("missing-equal-block", NET + "\ntrain { batch 20 }", 2, 15, ["missing '='", "number 20"]),
    ("missing-equal-statement", "network input(8) :: dense(2) :: softmax", 1, 9,
     ["missing '='", "name 'input'"]),
    ("stray-dollar", NET + " $", 1, 33, ["unexpected character '$'"]),
    ("stray-at", "input(8) @ dense(2) :: softmax", 1, 10, ["unexpected character '@'"]),
    ("unclosed-brace", NET + "\ntrain {\n  batch = 2\n", 3, 12,
     ["unclosed '{'", "'{' at 2:7", "end of file"]),
    ("missing-comma", "conv(28x28x1 field=3) :: dense(2) :: softmax", 1, 14,
     ["missing ','", "arguments", "name 'field'"]),
    ("missing-comma-list", NET + "\ntrain { augment = [shift(2) hflip] }", 2, 29,
     ["missing ','", "list items"]),
    ("missing-value", "conv(28x28x1, field=) :: dense(2) :: softmax", 1, 21,
     ["value is missing after '='", "found ')'"]),
    ("missing-value-eol", NET + "\ntrain { batch =\n}", 2, 16,
     ["value is missing after '='", "end of line"]),
    ("missing-chain-after-equal", "x = 3", 1, 5, ["after '='", "number 3"]),
    ("missing-colons-between-layers", "input(8) :: dense(2) softmax", 1, 22,
     ["missing '::'", "name 'softmax'"]),
    ("unmatched-rpar", NET + ")", 1, 32, ["unmatched ')'"]),
    ("unclosed-string", NET + '\ntrain { checkpoint = "runs }', 2, 22,
     ["unexpected character '\"'"]),
    ("chain-in-setting", NET + "\ntrain { optimizer = adam :: sgd }", 2, 26, ["chain", "'::'"]),
    ("block-left-open", "train {\n  batch = 2\nnetwork = input(8) :: dense(2) :: softmax", 3, 20,
     ["cannot be a setting's value", "is the '{' at 1:7 closed?"]),
    ("number-out-of-range", NET + "\ntrain { l2 = 1e999 }", 2, 14, ["out of range", "1e999"]),
    ("nested-too-deep", "input(8) :: dense(2, act=" + "[" * 200 + "]" * 200 + ") :: softmax", 1,
     25 + 128, ["nested more than 128 deep"]),
    # --- unknown names and keys ------------------------------------------------------------------
    ("unknown-layer", "input(8) :: dnse(2) :: softmax", 1, 13,
     ["unknown layer 'dnse'", "did you mean 'dense'?"]),
    ("unknown-layer-in-binding",
     "c0 = conv(28x28x1, filters=4)\nc1 = conv(filters=4)\nnetwork = c0 :: c1 :: dnse(2) :: softmax",
     3, 23, ["unknown layer 'dnse'", "did you mean 'dense'?"]),
    ("unknown-key", "conv(28x28x1, feild=3) :: dense(2) :: softmax", 1, 15,
     ["conv", "unknown argument 'feild'", "did you mean 'field'?", "it takes:"]),
    ("unknown-train-key", NET + "\ntrain { bacth = 2 }", 2, 9,
     ["unknown argument 'bacth'", "did you mean 'batch'?"]),
    ("key-given-twice", "input(8) :: dense(2, act=relu, act=gelu) :: softmax", 1, 32,
     ["'act' given twice"]),
    ("too-many-positional", "input(8) :: dropout(0.1, 0.2) :: dense(2) :: softmax", 1, 26,
     ["too many positional arguments", "Received: 0.2"]),
    ("missing-units", "input(8) :: dense :: softmax", 1, 13, ["dense", "missing argument 'units'"]),
    # --- bad values ------------------------------------------------------------------------------
    ("filters-zero", "conv(28x28x1, filters=0) :: dense(2) :: softmax", 1, 23,
     ["filters must be >= 1", "Received: filters=0"]),
    ("filters-fraction", "conv(28x28x1, filters=2.5) :: dense(2) :: softmax", 1, 23,
     ["filters must be a whole number", "Received: filters=2.5"]),
    ("dropout-p", "input(8) :: dropout(p=1.5) :: dense(2) :: softmax", 1, 23,
     ["p must be >= 0 and < 1", "Received: p=1.5"]),
    ("act-typo", "conv(28x28x1, act=relux) :: dense(2) :: softmax", 1, 19,
     ["unknown act 'relux'", "did you mean 'relu'?"]),
    ("pad-negative", "conv(28x28x1, pad=-1) :: dense(2) :: softmax", 1, 19,
     ["pad must be a whole number >= 0 or same", "Received: pad=-1"]),
    ("pad-same-even-field", "conv(28x28x1, field=4, pad=same) :: dense(2) :: softmax", 1, 28,
     ["pad=same needs an odd field", "field=4"]),
    ("units-string", 'input(8) :: dense("2") :: softmax', 1, 19,
     ["units must be a whole number", 'Received: units="2"']),
    ("shape-zero", "input(0) :: dense(2) :: softmax", 1, 7, ["at least 1"]),
    ("shape-huge", "input(99999999999999999999) :: dense(2) :: softmax", 1, 7, ["at most"]),
    ("shape-2d", "input(28x28) :: dense(2) :: softmax", 1, 7, ["WxHxC", "Received: 28x28"]),
    ("optimizer-lr", NET + "\ntrain { optimizer = adam(lr=0) }", 2, 29,
     ["lr must be > 0", "Received: lr=0"]),
    ("split-fraction", NET + "\ntrain { test = split(1.5) }", 2, 22,
     ["fraction must be > 0 and < 1"]),
    ("checkpoint-unquoted", NET + "\ntrain { checkpoint = runs }", 2, 22,
     ["checkpoint must be a quoted string"]),
    # --- shapes ----------------------------------------------------------------------------------
    ("field-does-not-fit", "conv(4x4x1, field=5) :: dense(2) :: softmax", 1, 19,
     ["conv conv1", "field 5 does not fit the 4x4x1 input", "Received: field=5"]),
    ("field-does-not-fit-later",
     "c0 = conv(8x8x1, field=3)\nc1 = conv(field=3)\nc2 = conv(field=5)\n"
     "network = c0 :: c1 :: c2 :: dense(2) :: softmax", 3, 17,
     ["conv c2", "field 5 does not fit the 4x4x1 input"]),
    ("softmax-after-map", "conv(28x28x1) :: softmax", 1, 18,
     ["softmax", "vector of class scores", "26x26x1", "dense"]),
    ("softmax-one-class", "input(8) :: dense(1) :: softmax", 1, 25, ["at least 2 classes"]),
    ("pool-too-big", "conv(3x3x1, field=1) :: maxpool(4) :: dense(2) :: softmax", 1, 33,
     ["window 4 does not fit the 3x3x1 input"]),
    ("pool-on-vector", "input(8) :: maxpool :: dense(2) :: softmax", 1, 13,
     ["needs an image input", "vector"]),
    ("input-shape-twice", "conv(28x28x1) :: conv(28x28x1) :: dense(2) :: softmax", 1, 23,
     ["only the first layer takes the input shape", "conv2"]),
    ("input-twice", "input(8) :: input(8) :: dense(2) :: softmax", 1, 13,
     ["input(...) may only start the network"]),
    ("missing-input-shape-conv", "conv(field=3) :: dense(2) :: softmax", 1, 1,
     ["needs the input shape", "input(28x28x1)"]),
    ("missing-input-shape-dense", "dense(2) :: softmax", 1, 1, ["input shape", "input("]),
    # --- network structure -----------------------------------------------------------------------
    ("no-network", "c0 = conv(28x28x1)\nc1 = dense(2)", 1, 1, ["no network", "network = "]),
    ("two-unbound-chains", NET + "\n" + NET, 2, 1, ["second unbound chain", "network = "]),
    ("network-and-unbound-chain", "network = " + NET + "\n" + NET, 2, 1,
     ["not bound", "already defines `network`"]),
    ("loss-not-last", "input(8) :: softmax :: dense(2)", 1, 13,
     ["softmax is a loss", "only end the network"]),
    ("no-loss", "input(8) :: dense(2)", 1, 13, ["must end with a loss", "softmax", "squared"]),
    ("name-used-twice", "a = dense(2)\nnetwork = input(8) :: a :: a :: softmax", 2, 28,
     ["'a' is used twice", "2:23"]),
    ("name-bound-twice", "network = " + NET + "\nnetwork = " + NET, 2, 1,
     ["'network' is already bound", "line 1"]),
    ("self-reference", "a = input(8) :: a :: softmax\nnetwork = a", 1, 17, ["'a' refers to itself"]),
    ("mutual-reference", "a = input(8) :: b\nb = a :: softmax\nnetwork = a", 2, 5,
     ["'a' refers to itself"]),
    ("bind-kind-name", "dense = dense(2)\nnetwork = input(8) :: dense :: softmax", 1, 1,
     ["'dense' is the name of a layer kind"]),
    ("bind-block-name", "train = input(8) :: dense(2) :: softmax", 1, 1, ["'train' is a block"]),
    ("call-bound-name", "a = dense(2)\nnetwork = input(8) :: a(3) :: softmax", 2, 23,
     ["'a' is a bound layer"]),
    ("unknown-block", NET + "\ntrian { batch = 2 }", 2, 1,
     ["unknown block 'trian'", "did you mean 'train'?"]),
    ("second-block", NET + "\ntrain { batch = 2 }\ntrain { epochs = 2 }", 3, 1,
     ["second train block", "line 2"]),
    ("duplicate-setting", NET + "\ntrain {\n  batch = 2\n  batch = 3\n}", 4, 3,
     ["'batch' is set twice"]),
    ("epochs-and-iterations", NET + "\ntrain { epochs = 2\n  iterations = 3 }", 3, 3,
     ["epochs or iterations, not both"]),
    ("unknown-optimizer", NET + "\ntrain { optimizer = adma(lr=1e-3) }", 2, 21,
     ["unknown optimizer 'adma'", "did you mean 'adam'?", "sgd"]),
    ("unknown-augment", NET + "\ntrain { augment = [shift(2), hlip] }", 2, 30,
     ["unknown augment 'hlip'", "did you mean 'hflip'?"]),
    ("augment-image-op-on-vectors", NET + "\ntrain {\n  augment = [noise(0.1), hflip] }", 3, 3,
     ["hflip needs image input", "vector of 8"]),
    ("augment-cutout-too-large", "input(8x6x1) :: dense(2) :: softmax\ntrain { augment = cutout(9) }", 2, 9,
     ["cutout(9)", "larger than the 8x6 input"]),
    ("augment-cutout-p", NET + "\ntrain { augment = [cutout(4, p=1.5)] }", 2, 32, ["p must be", "p=1.5"]),
    ("augment-too-many-flips", "input(4x4x1) :: dense(2) :: softmax\ntrain { augment = flip_pixels(17) }", 2, 9,
     ["flip_pixels(17)", "only 16 pixels"]),
    # --- skip connections -------------------------------------------------------------------------
    ("add-unknown-source", "s = dense(4)\nnetwork = input(8) :: s :: dense(4) :: add(z) :: softmax", 2, 44,
     ["add add1", "no layer named 'z'"]),
    ("add-typo-source", "stem = dense(4)\nnetwork = input(8) :: stem :: dense(4) :: add(from=stme) :: softmax",
     2, 52, ["no layer named 'stme'", "did you mean 'stem'?"]),
    ("add-later-source", "network = input(8) :: dense(4) :: add(dense2) :: dense(4) :: softmax", 1, 39,
     ["'dense2' comes after it", "earlier layer"]),
    ("add-itself", "a = add(a)\nnetwork = input(8) :: a :: softmax", 1, 9, ["'a' is this layer itself"]),
    ("add-enclosing-chain", "b = dense(8) :: add(b)\nnetwork = input(8) :: b :: softmax", 1, 21,
     ["'b' contains this layer"]),
    ("add-shape-mismatch", "network = input(8) :: dense(4) :: dense(3) :: add(dense1) :: softmax", 1, 51,
     ["cannot add the output of dense1 (4) to its input (3)", "shapes must be equal"]),
    ("add-number-source", NET.replace(" :: softmax", " :: add(2) :: softmax"), 1, 29,
     ["from must be the name of an earlier layer", "Received: from=2"]),
    ("add-missing-source", NET.replace(" :: softmax", " :: add :: softmax"), 1, 25, ["add", "from"]),
    ("init-unknown-name", NET + "\ninit { dense2 = he }", 2, 8,
     ["no layer named 'dense2'", "did you mean 'dense1'?"]),
    ("init-no-weights", NET + "\ninit { softmax1 = he }", 2, 8, ["has no weights"]),
    ("init-sub-chain-without-weights",
     "a = relu :: dropout\nnetwork = input(8) :: a :: dense(2) :: softmax\ninit { a = he }", 3, 8,
     ["a (relu :: dropout) has no weights"]),
    ("init-unknown-initialiser", NET + "\ninit { default = nromal(0, 1) }", 2, 18,
     ["unknown initialiser 'nromal'", "did you mean 'normal'?"]),
    # --- not a program at all ----------------------------------------------------------------------
    ("binary-garbage", "\x00\x01\x02\x7fELF\xff\xfe", 1, 1, ["unexpected character", "\\x00"]),
    ("form-feed-is-not-a-newline", "input(8)\x0c:: dnse(2) :: softmax", 1, 13, ["unknown layer"]),
    ("line-separator-is-not-a-newline", "input(8) ::\u2028 dense(2) :: softmax", 1, 12,
     ["unexpected character", "U+2028"]),
    ("crlf-lines", "input(8) ::\r\n dnse(2) :: softmax\r\n", 2, 2, ["unknown layer"]),
    ("garbage-after-program", NET + "\n\x1b[31m", 2, 1, ["unexpected character", "\\x1b"]),
]


@pytest.mark.parametrize("source,line,column,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_points_at_the_problem(source, line, column, words):
    with pytest.raises(FlowError) as info:
        build_text(source, "m.flow")
    err = info.value
    assert (err.line, err.column) == (line, column), err.render()
    for w in words:
        assert w in err.message, f"{w!r} not in {err.message!r}"
    text = str(err)
    assert text == err.render()
    assert text.startswith(f"m.flow:{line}:{column}: error: "), text
    shown = text.split("\n")
    # the offending line, then a caret under the column
    src_line = source.split("\n")[line - 1].rstrip("\r")  # only '\n' ends a line
    if len(src_line) <= 200:
        assert shown[1] == "    " + src_line
        assert shown[2] == "    " + " " * (column - 1) + "^"
    else:  # a long line is shown as a window around the column
        caret = shown[2].index("^")
        assert shown[1][caret] == src_line[column - 1]
    assert "Traceback" not in text


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("source", ["", "\n\n", "   # only a comment\n", "# a\n\n# b"])
def test_empty_file(source):
    with pytest.raises(FlowError) as info:
        build_text(source, "m.flow")
    err = info.value
    assert err.line is None and err.column is None
    assert "empty" in err.message
    assert str(err).startswith("m.flow: error: the file is empty")


def test_error_without_file_or_position():
    assert FlowError("boom").render() == "error: boom"
    assert FlowError("boom", "x.flow").render() == "x.flow: error: boom"
    assert FlowError("boom", None, 3, 2).render() == "<string>:3:2: error: boom"


def test_caret_respects_tabs():
    src = "input(8) ::\n\t\tdnse(2) :: softmax"
    with pytest.raises(FlowError) as info:
        build_text(src, "m.flow")
    err = info.value
    assert (err.line, err.column) == (2, 3)
    assert str(err).splitlines()[2] == "    \t\t^"


def test_very_long_line_is_windowed():
    src = "input(8) :: " + "relu :: " * 100 + "dnse(2) :: softmax"
    with pytest.raises(FlowError) as info:
        build_text(src, "m.flow")
    shown = str(info.value).splitlines()
    assert len(shown[1]) <= 4 + 200
    caret = shown[2].index("^")
    assert shown[1][caret:caret + 4] == "dnse"


def test_comment_brackets_do_not_count_as_nesting():
    src = "# " + "(" * 500 + "\n" + NET + "  # " + "[" * 500
    assert build_text(src, "m.flow").n_params() == 18


def test_error_in_string_argument_is_not_nesting():
    src = NET + '\ntrain { checkpoint = "' + "(" * 300 + '" }'
    assert build_text(src, "m.flow").train["checkpoint"] == "(" * 300


def test_a_join_that_starts_a_chain_with_no_names_is_a_positioned_error():
    """add(from=[]) first in a chain (found by the program fuzzer): an error at the layer, no
    IndexError."""
    from flowdsl.model import build_text
    from flowdsl.errors import FlowError
    import pytest
    with pytest.raises(FlowError) as e:
        build_text("add(from=[])\n", "t.flow")
    assert "t.flow:1:1" in str(e.value) or (e.value.line, e.value.column) == (1, 1), str(e.value)
    assert "needs the names" in str(e.value)
