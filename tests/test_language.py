"""The .flow language: canonical printing (parse(str(model)) is the same model), the grammar
under lark's strict mode, and robustness against pathological input. The examples and PRODUCT.md's
figures for them are in tests/test_examples.py."""
import importlib.util
import time
import tracemalloc

import pytest
from conftest import round_trip

from flowdsl.errors import FlowError
from flowdsl.model import build_text, load_model
from flowdsl.parse import _grammar_text


# --- canonical printing --------------------------------------------------------------------
ROUND_TRIPS = {
    "sub-chain bindings": """
        stem = conv(28x28x1, filters=4, act=relu) :: maxpool
        block = conv(filters=8, pad=same) :: relu :: maxpool
        head = flatten :: dense(10)
        network = stem :: block :: head :: softmax
        init { block = he  head = glorot }
    """,
    "nested bindings": """
        a = dense(4)
        b = a
        c = b :: relu
        network = input(8) :: c :: dense(2) :: softmax
        init { a = zeros  b = he }
    """,
    "bound single layers and auto names": """
        dense1 = dense(3)
        network = input(8) :: dense(2) :: dense1 :: softmax
    """,
    "multi-line chain": """
        network = input(28x28x1) ::
            conv(filters=2) ::
            maxpool
          :: flatten
          :: dense(2)
          :: softmax
    """,
    "comments everywhere": """
        # leading comment
        network = input(8)   # the input
          # a comment line inside the chain
          :: dense(4, act=relu) # hidden
          :: dense(2) :: softmax   # loss
        # between statements
        train {   # the block
          batch = 8   # per step
          # alone
          epochs = 2
        }
    """,
    "args spanning lines": """
        conv(28x28x1,
             filters=8,
             field=3,   # comment inside the call
             act=leakyrelu(
                 alpha=0.2),
        ) :: dense(2) :: softmax
    """,
    "lists": """
        input(8x8x1) :: flatten :: dense(2) :: softmax
        train {
          augment = [shift(2), hflip, noise(std=0.1), flip_pixels(3),]
        }
    """,
    "single augment and empty list": """
        input(8) :: dense(2) :: softmax
        train { augment = [] }
    """,
    "negative numbers and exponents": """
        input(8) :: dense(2) :: softmax
        init { dense1 = uniform(-0.5, 5e-1)  default = normal(-1, 1e-3) }
        train { optimizer = adam(lr=1e-3, beta2=0.9999)  l2 = 5E-4  schedule = step(10, gamma=.5) }
    """,
    "strings in both quotes": """
        input(8x8x1) :: flatten :: dense(2) :: softmax
        train {
          data = images('data dir', size=8x8, color="gray")
          test = npz("test.npz", x='xs', y="ys")
          checkpoint = 'say "hi"'
        }
    """,
    "aliases of kinds": """
        input(8x8x2) :: conv2d(filters=2) :: max2d(2, ceil=true) :: bn :: fc(4, act=identity)
          :: leaky_relu :: linear(3) :: crossentropy
    """,
    "everything default": "input(4) :: squared",
    "negative zero": "input(4) :: dropout(-0.0) :: dense(2) :: softmax\ninit { dense1 = normal(-0, 1) }",
    "long chain printed on several lines": """
        conv(28x28x1, filters=8, field=5, act=relu) :: maxpool(2) :: conv(filters=16, field=5, act=relu)
          :: maxpool(2) :: dense(64, act=gelu) :: dropout(0.25) :: dense(10) :: softmax
    """,
}


@pytest.mark.parametrize("source", ROUND_TRIPS.values(), ids=list(ROUND_TRIPS))
def test_canonical_printing_round_trips(source):
    m = build_text(source, "m.flow")
    round_trip(m)


def test_sub_chain_bindings_are_named_layers():
    m = build_text(ROUND_TRIPS["sub-chain bindings"])
    assert m.aliases["stem"] == (0, 1) and m.aliases["block"] == (2, 4)
    assert m.layer("block").kind == "maxpool"  # a sub-chain's name is its last layer
    assert m.layer("head").out == (10,)
    text = str(m)
    assert "block = conv(filters=8" in text and "network = stem :: block :: head :: softmax" in text
    assert set(m.init) == {"block", "head"}


def test_nested_bindings_keep_every_name():
    m = build_text(ROUND_TRIPS["nested bindings"])
    assert m.layers[1].name == "a" and m.aliases["b"] == (1, 1) and m.aliases["c"] == (1, 2)
    text = str(m)
    assert "\nb = a\n" in text and "c = b :: relu" in text


def test_multi_line_chain_is_one_chain():
    m = build_text(ROUND_TRIPS["multi-line chain"])
    assert [l.kind for l in m.layers] == ["input", "conv", "maxpool", "flatten", "dense", "softmax"]


def test_comments_are_ignored():
    m = build_text(ROUND_TRIPS["comments everywhere"])
    assert m.train["batch"] == 8 and m.train["epochs"] == 2
    assert "#" not in str(m)


def test_args_spanning_lines():
    m = build_text(ROUND_TRIPS["args spanning lines"])
    conv = m.layers[0]
    assert conv.args["filters"] == 8 and str(conv.args["act"]) == "leakyrelu(alpha=0.2)"


def test_numbers():
    m = build_text(ROUND_TRIPS["negative numbers and exponents"])
    assert m.init["dense1"]["lo"] == -0.5 and m.init["dense1"]["hi"] == 0.5
    assert m.init["default"]["mean"] == -1.0 and m.init["default"]["std"] == 1e-3
    assert m.train["optimizer"]["lr"] == 1e-3 and m.train["l2"] == 5e-4
    assert m.train["schedule"]["gamma"] == 0.5


def test_strings_in_either_quotes():
    m = build_text(ROUND_TRIPS["strings in both quotes"])
    assert m.train["data"]["dir"] == "data dir"
    assert m.train["data"]["color"] == "gray"
    assert (m.train["test"]["x"], m.train["test"]["y"]) == ("xs", "ys")
    assert m.train["checkpoint"] == 'say "hi"'
    assert "checkpoint = 'say \"hi\"'" in str(m)


def test_lists():
    m = build_text(ROUND_TRIPS["lists"])
    assert [a.name for a in m.train["augment"]] == ["shift", "hflip", "noise", "flip_pixels"]
    assert build_text(ROUND_TRIPS["single augment and empty list"]).train["augment"] == ()


def test_canonical_text_spells_out_every_argument():
    m = build_text("conv(8x8x1) :: maxpool :: dense(2) :: softmax")
    text = str(m)
    assert "conv(8x8x1, filters=1, field=3, stride=1, pad=0, act=linear)" in text
    assert "maxpool(size=2, stride=2, ceil=false)" in text


def test_crlf_and_tabs():
    src = "network = input(8)\t\r\n  :: dense(2)\r\n  :: softmax\r\ntrain {\r\n\tbatch = 4\r\n}\r\n"
    m = build_text(src)
    assert m.train["batch"] == 4 and len(m.layers) == 3


# --- the grammar -----------------------------------------------------------------------------
def test_grammar_is_strict_lalr():
    """No terminal collisions and no shift/reduce conflicts (lark's strict mode)."""
    if importlib.util.find_spec("interegular") is None:
        pytest.skip("lark strict mode needs interegular (pip install 'lark[interegular]')")
    from lark import Lark
    Lark(_grammar_text(), parser="lalr", lexer="basic", strict=True)


def test_grammar_names_no_layer_kind():
    """Adding a kind touches one file: the grammar knows no kinds."""
    from flowdsl.layers import all_names
    text = _grammar_text()
    for kind in all_names():
        assert f'"{kind}"' not in text


# --- robustness ------------------------------------------------------------------------------
def _nested(n):
    return "input(8) :: dense(2, act=" + "leakyrelu(" * n + ")" * n + ") :: softmax"


def test_nesting_100_is_quick():
    t = time.perf_counter()
    for src in (_nested(100), "input(8) :: dense(2, act=" + "[" * 100 + "]" * 100 + ") :: softmax",
                "input(8) :: dense(" + "(" * 100 + ")" * 100 + ") :: softmax"):
        with pytest.raises(FlowError) as info:
            build_text(src, "m.flow")
        assert info.value.line == 1
    assert time.perf_counter() - t < 2


@pytest.mark.parametrize("n", [1000, 100_000])
def test_deep_nesting_is_an_error(n):
    t = time.perf_counter()
    with pytest.raises(FlowError) as info:
        build_text(_nested(n), "m.flow")
    assert "nested" in info.value.message
    assert info.value.line == 1
    assert time.perf_counter() - t < 2


def test_ten_thousand_layer_chain():
    t = time.perf_counter()
    m = build_text("input(8) :: " + "relu :: " * 10_000 + "softmax", "long.flow")
    elapsed = time.perf_counter() - t
    print(f"10,000-layer chain built in {elapsed:.2f} s")
    assert len(m.layers) == 10_002
    assert m.layers[-2].name == "relu10000"
    assert elapsed < 15  # a few seconds on a quiet machine
    assert str(m).count("relu") == 10_000


def test_ten_thousand_dense_layers_error_at_the_end():
    src = "input(8) :: " + "dense(4) :: " * 10_000 + "dnse(2) :: softmax"
    with pytest.raises(FlowError) as info:
        build_text(src, "long.flow")
    assert info.value.column == len("input(8) :: " + "dense(4) :: " * 10_000) + 1


def test_huge_shape_is_only_estimated():
    tracemalloc.start()
    try:
        m = build_text("conv(100000x100000x3) :: dense(2) :: softmax", "big.flow")
        s = m.summary()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m.layers[0].out == (1, 99_998, 99_998)
    assert m.n_params() == 28 + 99_998 * 99_998 * 2 + 2
    assert "99998x99998x1" in s
    assert "GB" in s and "estimated, not allocated" in s
    assert peak < 20 * 2**20  # nothing the size of the model was allocated


def test_binary_file_is_a_flow_error(tmp_path):
    p = tmp_path / "garbage.flow"
    p.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(FlowError) as info:
        load_model(p)
    err = info.value
    # the first byte that is not UTF-8 is 0x80, on line 2 (after byte 0x0a) at column 0x80 - 10
    assert err.file == str(p) and (err.line, err.column) == (2, 118)
    assert "UTF-8" in err.message and "0x80" in err.message
    assert str(err).startswith(f"{p}:2:118: error: ")


def test_nul_bytes_are_a_flow_error(tmp_path):
    p = tmp_path / "nul.flow"
    p.write_bytes(b"input(8) :: dense(2)\n :: soft\x00max\n")
    with pytest.raises(FlowError) as info:
        load_model(p)
    assert (info.value.line, info.value.column) == (2, 9)
    assert "NUL" in info.value.message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FlowError) as info:
        load_model(tmp_path / "nope.flow")
    assert str(info.value) == f"{tmp_path / 'nope.flow'}: error: no such file"
    with pytest.raises(FlowError) as info:
        load_model(tmp_path)
    assert "directory" in info.value.message


def test_utf8_bom_and_unicode_comment(tmp_path):
    p = tmp_path / "bom.flow"
    p.write_bytes("\ufeff# größe — λ\ninput(8) :: dense(2) :: softmax\n".encode("utf-8"))
    assert load_model(p).n_params() == 18


def test_non_text_argument_is_a_flow_error():
    with pytest.raises(FlowError):
        build_text(b"input(8) :: dense(2) :: softmax")  # bytes, not str


def test_summary_sizes_in_readable_units():
    small = build_text("network = input(4x4x1) :: dense(10) :: softmax").summary()
    assert "170 weights (0.00 MB float32)" in small
    big = build_text("network = input(1000x1000x1) :: dense(300) :: softmax").summary()
    assert "300,000,300 weights (1.12 GB float32)" in big
    huge = build_text("network = input(100000x100000x3) :: dense(4000) :: softmax").summary()
    assert "(436.56 TB float32)" in huge and "TB (estimated" in huge


def test_stride_rounds_down_and_check_notes_the_unread_border():
    """(W + 2P - F) / S + 1 rounds down, as in PyTorch and Keras: the ResNet downsampling conv on
    14x14 gives 7x7, and the summary notes the border rows/columns a layer never reads."""
    m = build_text("input(14x14x1) :: conv(filters=16, field=3, stride=2, pad=1) :: "
                   "conv(filters=4, field=3, stride=3) :: conv(filters=2, field=2, stride=2) :: dense(10) :: softmax")
    assert m.layers[1].out == (16, 7, 7) and m.layers[2].out == (4, 2, 2) and m.layers[3].out == (2, 1, 1)
    notes = [line for line in m.summary().splitlines() if line.startswith("note:")]
    assert notes == ["note: conv1: stride 2 does not tile the padded 14x14x1 input: its last 1 row and 1 column "
                     "are never read",
                     "note: conv2: stride 3 does not tile the padded 7x7x16 input: its last 1 row and 1 column "
                     "are never read"]
    assert "note:" not in build_text("conv(28x28x1, filters=2, stride=1) :: dense(2) :: softmax").summary()
