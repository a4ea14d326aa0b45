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
