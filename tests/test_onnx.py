"""ONNX export: every layer kind (the registry's examples, as test_layers builds them) and every
example network, run by ONNX Runtime in both input layouts, give what net.predict gives."""
import sys
from pathlib import Path

import numpy as np
import pytest

import onnx  # noqa: F401  (the test extra installs onnx and onnxruntime)
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import naive  # noqa: E402
from conftest import ROOT  # noqa: E402

from flowdsl.errors import FlowError  # noqa: E402
from flowdsl.layers import REGISTRY, load_all  # noqa: E402
from flowdsl.model import build_text, load_model  # noqa: E402
from flowdsl.net import Net  # noqa: E402

load_all()
CASES = [(k, t, s) for k in sorted(REGISTRY) for t, s in naive.EXAMPLES.get(k, ())]
EXAMPLES = sorted((ROOT / "examples").glob("*.flow"))


def _net(src, seed=0):
    net = Net(build_text(src) if isinstance(src, str) else src, seed=seed)
    rng = np.random.default_rng(seed + 7)
    net.flat[...] += rng.normal(0.0, 0.2, net.flat.shape).astype(np.float32)   # biases, gammas off 0, 1
    for st in net.state.values():
        if "mean" in st:
            st["mean"][...] = rng.normal(0.0, 0.3, st["mean"].shape)
            st["var"][...] = rng.uniform(0.5, 2.0, st["var"].shape)
    return net


def _run(path, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    return sess.run(None, {inp.name: x})[0]


def _same(net, tmp_path, n=3, seed=1):
    """Export in both layouts and compare ONNX Runtime with net.predict on random input."""
    s = net.model.input_shape
    rng = np.random.default_rng(seed)
    x = rng.random((n, s[1], s[2], s[0]) if len(s) == 3 else (n, s[0])).astype(np.float32)
    want = net.predict(x)
    scale = max(1e-3, float(np.abs(want).max()))
    for layout in ("nhwc", "nchw"):
        path = tmp_path / f"m-{layout}.onnx"
        proto = net.export_onnx(path, layout)
        assert proto.opset_import[0].version == 17 and proto.ir_version == 8
        xi = x if layout == "nhwc" or len(s) != 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        got = _run(path, xi)
        if layout == "nchw" and got.ndim == 4:   # a map out comes in the input's layout
            got = got.transpose(0, 2, 3, 1)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4, err_msg=layout)
    return proto


@pytest.mark.parametrize("kind,text,shape", CASES, ids=[f"{k}:{t}@{s}" for k, t, s in CASES])
def test_every_kind_exports_and_runs_in_onnxruntime(kind, text, shape, tmp_path):
    role = REGISTRY[kind].role
    if role == "input":
        src = f"{text}({shape}) :: squared"
    elif role == "loss":
        src = f"input({shape}) :: {text}"
    else:
        src = f"input({shape}) :: {text} :: squared"
    _same(_net(src), tmp_path)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_exports_and_runs_in_onnxruntime(path, tmp_path):
    model = load_model(path)
    proto = _same(_net(model), tmp_path, n=2)
    names = {n.name.split("/")[0] for n in proto.graph.node}
    # the nodes are named after the .flow layers
    assert {l.name for l in model.layers if l.role != "input" and l.kind != "dropout"} <= names
    assert proto.graph.output[0].name == model.layers[-1].name


def test_dense_after_conv_flattens_in_flowdsls_order(tmp_path):
    """A dense layer after a conv reads the map in NHWC order: the export transposes back before
    Flatten, so the weights are used as trained (a wrong order would scramble them)."""
    net = _net("input(3x2x2) :: conv(filters=3, field=1) :: dense(4) :: squared")
    proto = _same(net, tmp_path)
    ops = [n.op_type for n in proto.graph.node]
    assert ops[ops.index("Conv") + 1:ops.index("Gemm")] == ["Transpose", "Flatten"]


def test_export_cli_and_errors(tmp_path):
    from conftest import run_cli
    f = tmp_path / "m.flow"
    f.write_text("conv(8x8x1, filters=2, act=gelu) :: maxpool(2, ceil=true) :: dense(3) :: softmax\n")
    net = _net(f.read_text())
    net.save(tmp_path / "w.npz")
    r = run_cli("export", f, "--weights", tmp_path / "w.npz")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").exists() and "wrote" in r.stdout
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), net.predict(x), atol=1e-6)
    r = run_cli("export", f, "--weights", tmp_path / "w.npz", "--out", tmp_path / "no" / "dir" / "m.onnx")
    assert r.returncode == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(FlowError, match="--layout must be"):
        net.export_onnx(tmp_path / "x.onnx", "nwhc")


# ------------------------------------------------------------------------------ import
def _table(model):
    """`flowdsl check`'s layer table and totals (not the train block's batch in the memory line)."""
    return [l for l in model.summary().splitlines() if " = " not in l and not l.startswith("Training memory")]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_export_then_import_gives_the_same_layout_and_outputs(path, tmp_path):
    from flowdsl.onnx_import import to_model
    net = _net(load_model(path), seed=4)
    net.export_onnx(tmp_path / "m.onnx")
    model, back, text = to_model(tmp_path / "m.onnx")
    assert _table(model) == _table(net.model), text
    s = net.model.input_shape
    x = np.random.default_rng(2).random((2, s[1], s[2], s[0])).astype(np.float32)
    np.testing.assert_array_equal(back.predict(x), net.predict(x))
    # import -> export -> ONNX Runtime: the original file's outputs
    back.export_onnx(tmp_path / "again.onnx")
    np.testing.assert_allclose(_run(tmp_path / "again.onnx", x), _run(tmp_path / "m.onnx", x), rtol=0, atol=0)


def _pytorch_like(tmp_path, rng):
    """An ONNX file in the shape PyTorch's exporter writes (NCHW, '/module/Op' names, Flatten in
    NCHW order before Gemm with transB=1): conv-relu-maxpool, a residual block with
    BatchNormalization and Add, a Concat, a Flatten, Gemm, Softmax."""
    from onnx import TensorProto, helper, numpy_helper
    f32 = np.float32
    inits = {
        "c1.w": rng.normal(0, 0.5, (4, 1, 3, 3)).astype(f32), "c1.b": rng.normal(0, 0.1, 4).astype(f32),
        "c2.w": rng.normal(0, 0.5, (4, 4, 3, 3)).astype(f32), "c2.b": rng.normal(0, 0.1, 4).astype(f32),
        "bn.g": rng.uniform(0.5, 1.5, 4).astype(f32), "bn.b": rng.normal(0, 0.1, 4).astype(f32),
        "bn.m": rng.normal(0, 0.1, 4).astype(f32), "bn.v": rng.uniform(0.5, 2, 4).astype(f32),
        "fc.w": rng.normal(0, 0.2, (3, 8 * 4 * 4)).astype(f32), "fc.b": rng.normal(0, 0.1, 3).astype(f32),
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c1.w", "c1.b"], ["t1"], name="/conv1/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("Relu", ["t1"], ["t2"], name="/relu/Relu"),
        n("MaxPool", ["t2"], ["t3"], name="/pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["t3", "c2.w", "c2.b"], ["t4"], name="/block/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["t4", "bn.g", "bn.b", "bn.m", "bn.v"], ["t5"], name="/block/bn/BatchNormalization",
          epsilon=1e-5),
        n("Add", ["t5", "t3"], ["t6"], name="/block/Add"),
        n("Relu", ["t6"], ["t7"], name="/block/relu/Relu"),
        n("Concat", ["t7", "t3"], ["t8"], name="/Concat", axis=1),
        n("Flatten", ["t8"], ["t9"], name="/Flatten", axis=1),
        n("Gemm", ["t9", "fc.w", "fc.b"], ["t10"], name="/fc/Gemm", transB=1),
        n("Softmax", ["t10"], ["y"], name="/Softmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "torch_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, producer_name="pytorch", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "torch_like.onnx"
    onnx.save(model, str(path))
    return path


def test_a_pytorch_style_file_imports_and_matches_onnxruntime(tmp_path):
    from conftest import run_cli
    rng = np.random.default_rng(0)
    path = _pytorch_like(tmp_path, rng)
    x = rng.random((3, 1, 8, 8)).astype(np.float32)
    want = _run(path, x)
    r = run_cli("import", path, "--out", tmp_path / "imported.flow")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "imported.flow").read_text()
    assert "input(8x8x1) :: conv1" in text and "add(from=" in text and "concat(" in text, text
    import flowdsl
    net = flowdsl.load(tmp_path / "imported.flow", weights=tmp_path / "imported.npz")
    np.testing.assert_allclose(net.predict(x), want, atol=1e-6, rtol=1e-5)   # NCHW accepted by predict
    assert run_cli("check", tmp_path / "imported.flow").returncode == 0
    xs = (np.random.default_rng(3).random((12, 8, 8, 1)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=xs, y=np.arange(12) % 3)
    r = run_cli("eval", tmp_path / "imported.flow", "--weights", tmp_path / "imported.npz",
                "--data", f'npz("{tmp_path / "d.npz"}")')
    assert r.returncode == 0 and "accuracy" in r.stdout, r.stderr
    # and it trains (fine-tuning): one step moves the weights
    before = net.flat.copy()
    net.fit(np.random.default_rng(1).random((8, 8, 8, 1)).astype(np.float32), np.arange(8) % 3, epochs=1,
            batch=8, verbose=0)
    assert not np.array_equal(before, net.flat)


def test_unsupported_op_is_a_clear_error(tmp_path):
    from onnx import TensorProto, helper
    from conftest import run_cli
    nodes = [helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="/rnn/LSTM", hidden_size=2)]
    f = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "rnn", [f("x", TensorProto.FLOAT, [5, 1, 3]), f("w", TensorProto.FLOAT, [1, 8, 3]),
                                             f("r", TensorProto.FLOAT, [1, 8, 2])],
                              [f("y", TensorProto.FLOAT, [5, 1, 1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "rnn.onnx"))
    r = run_cli("import", tmp_path / "rnn.onnx")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    r2 = run_cli("import", tmp_path / "junk.onnx")
    assert r2.returncode == 1 and "not an ONNX model" in r2.stderr and "Traceback" not in r2.stderr
    # one input: the message names the problem; a single-input LSTM names the op, node, opset
    graph = helper.make_graph([helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="/rnn/LSTM", hidden_size=2)],
                              "rnn", [f("x", TensorProto.FLOAT, [5, 1, 3])], [f("y", TensorProto.FLOAT, [5, 1, 1, 2])],
                              initializer=[onnx.numpy_helper.from_array(np.zeros((1, 8, 3), np.float32), "w"),
                                           onnx.numpy_helper.from_array(np.zeros((1, 8, 2), np.float32), "r")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "rnn1.onnx"))
    r3 = run_cli("import", tmp_path / "rnn1.onnx")
    assert r3.returncode == 1 and "Traceback" not in r3.stderr
    assert all(s in r3.stderr for s in ("LSTM", "/rnn/LSTM", "opset 17", "Conv, Gemm")), r3.stderr


def test_glasses_focus_is_the_same_after_export_and_import(tmp_path):
    from conftest import run_cli
    net = _net(load_model(ROOT / "examples" / "glasses.flow"), seed=5)
    net.save(tmp_path / "w.npz")
    net.export_onnx(tmp_path / "g.onnx")
    assert run_cli("import", tmp_path / "g.onnx").returncode == 0
    img = ROOT / "examples" / "glasses" / "glasses" / "000.png"
    a = run_cli("focus", ROOT / "examples" / "glasses.flow", "--weights", tmp_path / "w.npz", "--layer", "c3",
                "--input", img, "--out", tmp_path / "fa")
    b = run_cli("focus", tmp_path / "g.flow", "--weights", tmp_path / "g.npz", "--layer", "c3",
                "--input", img, "--out", tmp_path / "fb")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pa, pb = sorted(p.name for p in (tmp_path / "fa").glob("*.png")), sorted(p.name for p in (tmp_path / "fb").glob("*.png"))
    assert pa == pb and pa
    assert all((tmp_path / "fa" / n).read_bytes() == (tmp_path / "fb" / n).read_bytes() for n in pa)


def test_a_keras_style_file_imports_and_matches_onnxruntime(tmp_path):
    """tf2onnx's shape of a Keras CNN: NHWC input behind a Transpose, the map transposed back to
    NHWC before a Reshape to (N, -1), Dense as MatMul + Add, a LeakyRelu with its alpha, an
    AveragePool with ceil_mode, a GlobalAveragePool branch joined by Concat."""
    from onnx import TensorProto, helper, numpy_helper
    from flowdsl.onnx_import import to_model
    rng = np.random.default_rng(4)
    f32 = np.float32
    inits = {"k": rng.normal(0, 0.5, (3, 2, 3, 3)).astype(f32), "kb": rng.normal(0, 0.1, 3).astype(f32),
             "shape": np.array([-1, 27], np.int64),
             "d": rng.normal(0, 0.3, (27, 4)).astype(f32), "db": rng.normal(0, 0.1, 4).astype(f32)}
    n = helper.make_node
    nodes = [
        n("Transpose", ["in"], ["t0"], name="conv2d/transpose", perm=[0, 3, 1, 2]),
        n("Conv", ["t0", "k", "kb"], ["t1"], name="conv2d", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("LeakyRelu", ["t1"], ["t2"], name="leaky", alpha=0.2),
        n("AveragePool", ["t2"], ["t3"], name="avg", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        n("Transpose", ["t3"], ["t4"], name="flatten/transpose", perm=[0, 2, 3, 1]),
        n("Reshape", ["t4", "shape"], ["t5"], name="flatten/Reshape"),
        n("MatMul", ["t5", "d"], ["t6"], name="dense/MatMul"),
        n("Add", ["t6", "db"], ["t7"], name="dense/BiasAdd"),
        n("Softmax", ["t7"], ["out"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "keras_like", [helper.make_tensor_value_info("in", TensorProto.FLOAT, ["N", 5, 5, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, producer_name="tf2onnx", opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "k.onnx"))
    x = rng.random((3, 5, 5, 2)).astype(np.float32)
    m, net, text = to_model(tmp_path / "k.onnx")
    assert "conv(filters=3, field=3, stride=1, pad=1, act=leakyrelu(alpha=0.2))" in text, text
    assert "avgpool(size=2, stride=2, ceil=true)" in text and "dense(units=4, act=linear)" in text, text
    np.testing.assert_allclose(net.predict(x), _run(tmp_path / "k.onnx", x), atol=1e-6, rtol=1e-5)
