"""Property tests: whatever text it is given, build_text either returns a Model or raises
FlowError. Nothing else (no lark exception, RecursionError, KeyError, ...) may escape.

The number of examples per test is FLOWDSL_FUZZ_EXAMPLES (default 1000; the two fuzz tests
together run at least 2,000 by default)."""
import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowdsl import layers as registry
from flowdsl.errors import FlowError
from flowdsl.layers import all_names
from flowdsl.model import Model, build_text

EXAMPLES = int(os.environ.get("FLOWDSL_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def check_outcome(text):
    """Build `text`; a Model must print and round-trip, a FlowError must render."""
    try:
        m = build_text(text, "fuzz.flow")
    except FlowError as e:
        out = e.render()
        assert out.startswith("fuzz.flow")
        assert "error: " in out
        assert isinstance(e.message, str) and e.message
        if e.line is not None:
            assert e.line >= 1
            assert e.column is None or e.column >= 1
        return None
    assert isinstance(m, Model)
    assert "Total:" in m.summary()
    again = build_text(str(m), "canonical.flow")
    assert again.spec() == m.spec(), str(m)
    return m


# --- (a) arbitrary text ----------------------------------------------------------------------
ODD = st.sampled_from(["\x00", "\r", "\r\n", "\t", "\x0c", "\ufeff", "\u2028", "\u00a0", "é", "λ",
                       "\U0001F600", "\u200b", "(", ")", "[", "]", "{", "}",
                       "::", ":", "=", ",", "#", "\"", "'", "x", "e", "-", ".", "0", "9"])
TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(ODD, st.text(max_size=4)), max_size=60).map("".join),
)


@FUZZ
@given(TEXT)
def test_random_text_gives_model_or_flowerror(text):
    check_outcome(text)


# --- (b) token soup from the language's own vocabulary ----------------------------------------
KINDS = sorted(all_names())
NAMES = st.sampled_from(KINDS + ["network", "train", "init", "a", "b", "c0", "x", "default",
                                 "true", "false", "same", "relu", "normal", "adam", "split",
                                 "images", "shift", "hflip", "units", "filters", "field",
                                 "stride", "pad", "act", "size", "ceil", "p", "batch", "epochs",
                                 "iterations", "optimizer", "lr", "dnse", "dense1", "conv1"])
NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=40).map(str),
    st.sampled_from(["0", "1", "2", "1e-3", "-1", "0.5", "1.5", "2.5", ".5", "1.", "+2", "1e999",
                     "-0.0", "9" * 30, "2147483648", "1E5", "7e-400"]),
)
SHAPES = st.one_of(
    st.sampled_from(["28x28x1", "8x8x3", "4x4x1", "400x400x3", "28x28", "1x1x1", "0x4x4",
                     "100000x100000x3", "3x3x1x1", "2x2x64"]),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4))
      .map(lambda t: "%dx%dx%d" % t),
)
STRINGS = st.sampled_from(['"glasses"', "'x'", '""', "'a\"b'", '"runs/x"', '"train"', "'test'"])
PUNCT = st.sampled_from(["(", ")", "[", "]", "{", "}", "=", ",", "::", "::", "::", "\n", "\n",
                         "  # a comment\n", "\n\n", " "])
TOKEN = st.one_of(NAMES, NAMES, NUMBERS, SHAPES, STRINGS, PUNCT, PUNCT)

# Programs built from the grammar (a layer chain, bindings, blocks, in varied layout), then
# sometimes broken by deleting, duplicating or replacing one token: most are valid or nearly so,
# which is where the round trip and shape inference are exercised. The layers come from the
# registry (every kind, under each of its names, with arguments from its declared parameters),
# so a new kind is fuzzed without touching this file.
registry.load_all()


def _spellings(kind):
    """Every name that builds `kind`: (name, needs arguments) pairs."""
    return ([(kind, False)] + [(a, False) for a, k in sorted(registry.ALIASES.items()) if k == kind]
            + [(a, True) for a, k in sorted(registry.CALL_ALIASES.items()) if k == kind])


def _role(*roles):
    return sorted(k for k, c in registry.REGISTRY.items() if c.role in roles)


BODY = _role("layer", "activation")
WEIGHTED = sorted(k for k in BODY if registry.REGISTRY[k].has_weights)
FIRST = sorted(k for k, c in registry.REGISTRY.items() if any(p.kind == "shape" for p in c.params))
LOSSES = sorted(n for k in _role("loss") for n, _ in _spellings(k))


def _takes_a_vector(kind):
    try:
        build_text(f"{kind}(8) :: squared")
        return True
    except FlowError:
        return False


VECTOR_FIRST = [k for k in FIRST if _takes_a_vector(k)]   # input(8); conv needs a map
assert VECTOR_FIRST, FIRST
# a kind with a required whole-number size (dense(units)): what gives a classifier its scores
HEADS = sorted(k for k in WEIGHTED if any(p.required and p.kind == "int" for p in registry.REGISTRY[k].params))


@st.composite
def value_texts(draw, p):
    """A small value of parameter p's type, mostly inside its declared range."""
    if p.kind == "int":
        lo = 1 if p.lo is None else int(p.lo) + (1 if p.lo_open else 0)
        return str(draw(st.integers(lo, lo + 2)))
    if p.kind == "float":
        ok = [v for v in (0.0, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0, 2.0)
              if (p.lo is None or v > p.lo or v == p.lo and not p.lo_open)
              and (p.hi is None or v < p.hi or v == p.hi and not p.hi_open)]
        return draw(st.sampled_from([str(v) for v in ok] or ["0.5"]))
    if p.kind == "bool":
        return draw(st.sampled_from(["true", "false"]))
    if p.kind == "pad":
        return draw(st.sampled_from(["0", "1", "2", "same"]))
    if p.kind == "call":
        return draw(act_texts())
    if p.kind == "layer":  # mostly one that exists (a chain's input), now and then a binding
        return draw(st.sampled_from(["input1", "input1", "input1", "a", "c0"]))
    if p.kind == "shape":
        return draw(st.sampled_from(["8x8x1", "4x4x2", "6x5x3"]))
    return draw(st.sampled_from(['"x"', "1", "true"]))


@st.composite
def arg_texts(draw, params, given=(), omit=()):
    """Arguments for a signature: the required ones and some others, positional for a prefix.
    given: names already written positionally in front (the first layer's shape); omit: names
    never written (a shape mid-chain), which end the positional prefix as any left-out one does."""
    chosen = [p for p in params if p.name not in given and p.name not in omit
              and (p.required or draw(st.booleans()))]
    out, positional = [], True
    for p in params:
        if p.name in given:
            continue
        if p not in chosen:
            positional = False
            continue
        value = draw(value_texts(p))
        positional = positional and p.positional and draw(st.booleans())
        out.append(value if positional else f"{p.name}={value}")
    return ", ".join(out)


@st.composite
def call_texts(draw, name, params, needs_args=False):
    args = draw(arg_texts(params))   # params: the whole signature, or positions shift
    if args or needs_args:
        return f"{name}({args})"
    return draw(st.sampled_from([name, name + "()"]))


@st.composite
def act_texts(draw):
    table = registry.activation_table()
    name = draw(st.sampled_from(sorted(table)))
    return draw(call_texts(name, table[name]))


@st.composite
def layer_texts(draw, kind=None):
    if kind is None:
        kind = draw(st.sampled_from(BODY + WEIGHTED * 2))   # the kinds with weights a little more often
    name, needs_args = draw(st.sampled_from(_spellings(kind)))
    params = registry.REGISTRY[kind].params
    shapes = [p.name for p in params if p.kind == "shape"]   # mid-chain the shape is inferred
    args = draw(arg_texts(params, omit=shapes))
    if args or needs_args:
        return f"{name}({args})"
    return draw(st.sampled_from([name, name + "()"]))


@st.composite
def first_texts(draw):
    """A first layer: a kind that takes the input shape, given one (a vector only to the kinds
    that take one)."""
    if draw(st.integers(0, 2)):   # an image two times in three: most kinds want one
        kind = draw(st.sampled_from(FIRST))
        side = st.one_of(st.integers(1, 12), st.integers(6, 16))   # mostly room for a few layers
        shape = "%dx%dx%d" % (draw(side), draw(side), draw(st.integers(1, 3)))
    else:
        kind = draw(st.sampled_from(VECTOR_FIRST))
        shape = str(draw(st.integers(1, 20)))
    name, _ = draw(st.sampled_from(_spellings(kind)))
    params = registry.REGISTRY[kind].params
    rest = draw(arg_texts(params, given=[p.name for p in params if p.kind == "shape"]))
    return f"{name}({shape}{', ' + rest if rest else ''})"


# Fragments of valid programs, so that the soup often gets deep into shape inference too.
FRAGMENTS = st.one_of(
    first_texts().map(lambda t: t + " :: "), layer_texts().map(lambda t: t + " :: "),
    st.sampled_from(LOSSES),
    st.sampled_from(["\nnetwork = ", "a = ", "\na :: b", "\ntrain { batch = 2 }",
                     "\ninit { default = he }", "\ntrain { optimizer = adam(lr=1e-3)\n epochs = 1 }",
                     "\ntrain { augment = [shift(2), hflip] }", "\ntrain { data = images(\"d\", size=8x8) }"]),
)


@st.composite
def token_programs(draw):
    parts = draw(st.lists(st.one_of(TOKEN, TOKEN, FRAGMENTS), min_size=0, max_size=40))
    seps = draw(st.lists(st.sampled_from(["", " ", " ", "\n"]), min_size=len(parts),
                         max_size=len(parts)))
    return "".join(p + s for p, s in zip(parts, seps))


@st.composite
def structured_programs(draw):
    first = draw(first_texts())
    body = draw(st.lists(layer_texts(), max_size=6))
    loss = draw(st.sampled_from(LOSSES))
    if registry.lookup(loss, False).targets == "labels":   # classes: a vector of >= 2 scores
        body.append(f"{draw(st.sampled_from(HEADS))}({draw(st.integers(2, 5))})")
    chain = [first] + body + [loss]
    lines = []
    # bind some spans of the chain to names
    names = iter(["a", "b", "c0", "block", "head", "x1"])
    out, i = [], 0
    while i < len(chain):
        n = draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0
        if n and i + n <= len(chain):
            name = next(names, None)
            if name:
                lines.append(f"{name} = {' :: '.join(chain[i:i + n])}")
                out.append(name)
                i += n
                continue
        out.append(chain[i])
        i += 1
    sep = draw(st.sampled_from([" :: ", " ::\n  ", "\n  :: ", " :: # note\n  ", "::"]))
    net = sep.join(out)
    if lines and draw(st.booleans()):
        lines.append(f"network = {net}")
    elif lines:
        lines.append(net)
    else:
        lines.append(draw(st.sampled_from([net, f"network = {net}"])))
    if draw(st.booleans()):
        settings_ = draw(st.lists(st.sampled_from([
            "batch = 2", "epochs = 3", "iterations = 5", "seed = 1", "l2 = 1e-4",
            "optimizer = adam(lr=1e-3)", "optimizer = momentum(lr=0.01, mu=0.8)", "optimizer = sgd",
            "schedule = step(10, gamma=0.5)", "schedule = cosine", "schedule = onecycle",
            "test = split(0.2)", 'data = images("imgs", size=8x8, color=gray)',
            "data = idx('a.gz', 'b.gz')", 'checkpoint = "runs/x"', "checkpoint = 'it\"s'",
            "augment = [shift(2), hflip, noise(0.1)]", "augment = flip_pixels(3)", "patience = 2",
            'data = npz("d.npz", x="xs")', "test = fashion_mnist(test)", 'data = csv("t.csv")',
        ]), max_size=4, unique=True))
        lines.append("train {\n  " + "\n  ".join(settings_) + "\n}")
    if draw(st.booleans()):
        inits = draw(st.lists(st.sampled_from([
            "default = he", "default = glorot", "a = normal(0, 0.1)", "b = uniform(-1, 1)",
            "conv1 = zeros", "dense1 = constant(0.5)", "head = he"]), max_size=3, unique=True))
        lines.append("init { " + "  ".join(inits) + " }")
    order = draw(st.permutations(lines)) if draw(st.integers(0, 4)) == 0 else lines
    return "# generated\n" + "\n".join(order) + "\n"


@st.composite
def mutated(draw, programs):
    text = draw(programs)
    if draw(st.integers(0, 2)) == 0:
        return text
    toks = [t for t in re.split(r"(\s+|::|[()\[\]{}=,])", text) if t]
    i = draw(st.integers(0, max(0, len(toks) - 1)))
    op = draw(st.sampled_from(["delete", "duplicate", "replace", "insert"]))
    if op == "delete":
        del toks[i:i + 1]
    elif op == "duplicate":
        toks[i:i] = toks[i:i + 1]
    else:
        new = draw(TOKEN)
        toks[i:i + (op == "replace")] = [new]
    return "".join(toks)


@FUZZ
@given(st.one_of(token_programs(), mutated(structured_programs())))
def test_token_soup_gives_model_or_flowerror(text):
    check_outcome(text)


def test_structured_programs_mostly_build():
    """The structured generator really reaches models (else the round trip goes untested)."""
    models = 0
    texts = []

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(structured_programs())
    def collect(text):
        texts.append(text)

    collect()
    for t in texts:
        try:
            build_text(t)
            models += 1
        except FlowError:
            pass
    assert models >= len(texts) // 4, (models, len(texts))


def test_generator_builds_every_kind():
    """For every registered layer and activation kind, the generator writes texts that build
    (after an image or a vector input): a new kind whose parameters it cannot fill fails here,
    instead of only ever giving errors in the fuzz tests."""
    for kind in BODY:
        texts = []

        @settings(max_examples=30, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(layer_texts(kind))
        def collect(text):
            texts.append(text)

        collect()
        built = 0
        for t in texts:
            for first in ("input(8x8x2)", "input(8)"):
                try:
                    m = build_text(f"{first} :: {t} :: squared")
                except FlowError:
                    continue
                assert m.layers[1].kind == kind, (t, m.layers[1].kind)
                built += 1
        assert built, f"no generated text of '{kind}' builds: {texts[:5]}"


def test_fuzz_examples_budget():
    """The default keeps at least 2,000 examples across both fuzz tests."""
    assert 2 * EXAMPLES >= 2000 or "FLOWDSL_FUZZ_EXAMPLES" in os.environ


def test_check_outcome_catches_models():
    """The oracle itself: a valid program gives a model that round-trips."""
    m = check_outcome("input(8) :: dense(2, act=relu) :: softmax")
    assert m is not None and m.n_params() == 18
    assert check_outcome("input(8) :: dnse(2) :: softmax") is None
