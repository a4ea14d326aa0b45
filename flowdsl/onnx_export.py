"""Export a Net to ONNX (`flowdsl export FILE --weights CKPT`, `net.export_onnx(path)`).

The graph takes NHWC input by default (one Transpose at the top; `layout="nchw"` takes NCHW)
with a dynamic batch dimension, works in NCHW inside (as ONNX's Conv and pools do), and ends in
the loss layer's output form: probabilities (softmax) or values (squared). Each layer writes
its own nodes (`Layer.to_onnx(g, x, p, state)`, asked of the layer, never of its kind name)
through the Graph below, named after the .flow layer: a layer's output tensor is called as the
layer is. A vector taken from a map is flattened in NHWC order, as flowdsl flattens (a
Transpose back before Flatten), so dense weights stay as they are.

Opset 17, IR version 8 (what ONNX Runtime 1.1x and later, OpenCV's DNN and TensorRT 8.6 read):
gelu is written out from Tanh, Mul and Add rather than with opset 20's Gelu, and conv's padding
modes as two Gathers with flowdsl's own index tables (ONNX's Pad has no `reflect` in scipy's
sense and `wrap` only from opset 19). A kind with no mapping is a FlowError naming it.

onnx is imported only here (the `flowdsl[onnx]` extra)."""
from __future__ import annotations

import numpy as np

from .errors import FlowError

OPSET = 17
IR_VERSION = 8


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise FlowError('exporting to ONNX needs the onnx package: pip install "flowdsl[onnx]"') from None
    return onnx, helper, numpy_helper


class Graph:
    """Nodes and initializers under construction, and the layout of each tensor: "map" (NCHW)
    or "vec" (N, D)."""

    def __init__(self, helper, numpy_helper):
        self.h, self.nh = helper, numpy_helper
        self.nodes, self.inits, self.kind = [], [], {}
        self._names = set()

    def unique(self, base):
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def const(self, base, array, dtype=np.float32):
        name = self.unique(base)
        self.inits.append(self.nh.from_array(np.require(np.asarray(array, dtype), requirements="C"), name))
        return name

    def op(self, op_type, inputs, out=None, kind=None, **attrs):
        """A node; returns its output's name (`out`, or a fresh name)."""
        out = self.unique(out or f"{op_type.lower()}")
        self.nodes.append(self.h.make_node(op_type, list(inputs), [out], name=self.unique(f"{out}/{op_type}"),
                                           **attrs))
        if kind is not None:
            self.kind[out] = kind
        return out

    def vector(self, x, name, out=None):
        """x as an (N, D) vector: a map is flattened in NHWC order, as flowdsl flattens."""
        if self.kind[x] == "vec":
            return x if out is None else self.op("Identity", [x], out, kind="vec")
        t = self.op("Transpose", [x], f"{name}/nhwc", perm=[0, 2, 3, 1])
        return self.op("Flatten", [t], out or f"{name}/flat", kind="vec", axis=1)

    def act(self, act, x, name):
        """The activation (kind, alpha) applied to x; the activation class writes its nodes."""
        from .layers.activations import act_class
        kind, alpha = act
        cls = act_class(kind)
        y = cls.to_onnx_act(self, x, float(alpha), name)
        self.kind[y] = self.kind[x]
        return y

    def unsupported(self, layer, why=""):
        return FlowError(f"{layer.kind} {layer.name} cannot be exported to ONNX{': ' + why if why else ''}")


def export(net, path, layout="nhwc"):
    """Write net as an ONNX file at path; returns the onnx ModelProto."""
    if layout not in ("nhwc", "nchw"):
        raise FlowError(f"--layout must be nhwc or nchw. Received: {layout}")
    onnx, helper, numpy_helper = _onnx()
    from onnx import TensorProto
    model = net.model
    g = Graph(helper, numpy_helper)
    s = model.input_shape
    if len(s) == 3:
        c, h, w = s
        dims = ["N", h, w, c] if layout == "nhwc" else ["N", c, h, w]
    else:
        dims = ["N", s[0]]
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
    g._names.add("input")
    if len(s) == 3:
        x = g.op("Transpose", ["input"], "input/nchw", kind="map", perm=[0, 3, 1, 2]) if layout == "nhwc" else "input"
        g.kind["input"] = "map"
    else:
        x, g.kind["input"] = "input", "vec"
    first = model.layers[0]
    outs = {first.name: x} if first.role == "input" else {}
    prev = x
    for l in model.layers[1:] if first.role == "input" else model.layers:
        xin = outs[l.feed.name] if l.feed is not None else prev
        extras = [outs[m.name] for m in l.inputs()]
        n0 = len(g.nodes)
        y = l.to_onnx(g, xin, net.params.get(l.name, {}), net.state.get(l.name, {}), extras)
        outs[l.name] = prev = y
        hints = _hints(l)
        if hints and len(g.nodes) > n0:   # on the layer's first node, for `flowdsl import`
            g.nodes[n0].doc_string = "flowdsl: " + ", ".join(hints)
    final = prev
    out_name = model.layers[-1].name
    k = model.layers[-1].out
    dims = ["N"] + list(k)
    if g.kind[final] == "map" and layout == "nhwc":   # a map out (squared on a map): in the input's layout
        final = g.op("Transpose", [final], out_name, kind="map", perm=[0, 2, 3, 1])
        dims = ["N", k[1], k[2], k[0]]
    elif final != out_name:   # the graph's output carries the loss layer's name
        final = g.op("Identity", [final], out_name, kind=g.kind[final])
    out = helper.make_tensor_value_info(final, TensorProto.FLOAT, dims)
    graph = helper.make_graph(g.nodes, model.file and _stem(model.file) or "flowdsl", [inp], [out],
                              initializer=g.inits)
    proto = helper.make_model(graph, producer_name="flowdsl", opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    proto.doc_string = str(model)
    # what the graph cannot say, for `flowdsl import`: whether the source had an input(...) layer
    # and the names of its sub-chains (binding name -> the layer it ends with)
    import json
    helper.set_model_props(proto, {"flowdsl.input_layer": "yes" if first.role == "input" else "no",
                                   "flowdsl.aliases": json.dumps({a: model.layers[j].name
                                                                  for a, (i, j) in model.aliases.items()})})
    onnx.checker.check_model(proto, full_check=True)
    try:
        onnx.save(proto, str(path))
    except OSError as e:
        raise FlowError(f"cannot write {path}: {e.strerror or e}") from None
    return proto


def _hints(layer):
    """What the source wrote that the graph cannot say (it computes the same either way):
    pad=same, trainable=false, softmax's label smoothing."""
    a = layer.args
    out = []
    if a.get("pad") == "same":
        out.append("pad=same")
    if a.get("trainable") is False:
        out.append("trainable=false")
    if a.get("smoothing"):
        out.append(f"smoothing={a['smoothing']!r}")
    return out


def _stem(path):
    import os
    return os.path.splitext(os.path.basename(path))[0]


# ------------------------------------------------------------------ shared by the layers' to_onnx
def pool_pads(layer, h, w, oh, ow):
    """ONNX pads [top, left, bottom, right] that give a pool or conv the output size oh x ow with
    ONNX's floor rule: `pad` before, and after whatever a last (ceil=true) window hangs over."""
    k, s, p = layer.size, layer.stride, layer.pad
    bottom = max(0, (oh - 1) * s + k - h - p)
    right = max(0, (ow - 1) * s + k - w - p)
    return [p, p, bottom, right]
