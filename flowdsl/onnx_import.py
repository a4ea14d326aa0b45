"""Import an ONNX CNN as .flow source and weights (`flowdsl import model.onnx [--out model.flow]`).

For graphs as PyTorch's and Keras' exporters (and flowdsl's own) write them: one float input,
NCHW (N, C, H, W) or a vector (N, D), or NHWC behind a Transpose(perm=[0, 3, 1, 2]); the ops
Conv, Gemm, MatMul (+ Add of a constant), Relu, Sigmoid, Tanh, LeakyRelu, Elu, Softplus, MaxPool,
AveragePool, LpPool (p=2), GlobalAveragePool, BatchNormalization, Flatten, Reshape (to N x D),
Add, Concat, Softmax, LogSoftmax, Dropout, Identity. ONNX shape inference runs first; weights are
turned into flowdsl's layouts (conv (K, C, F, F) -> (F, F, C, K)); a dense layer after a Flatten of
a map gets its rows reordered from ONNX's NCHW order to flowdsl's NHWC order; an activation right
after a conv or dense becomes its act= (unless the file is flowdsl's own export, which says which
activations were layers). Anything else is a FlowError naming the op, the node and the opset, with
the supported ops listed.

The result: a Model text (every weighted layer bound by its ONNX name, branches as bindings) and
{checkpoint key: array} that checkpoint.save writes, so every verb works on the import."""
from __future__ import annotations

import re

import numpy as np

from .errors import FlowError

SUPPORTED = ("Conv", "Gemm", "MatMul", "Add", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Softplus", "Gelu",
             "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "BatchNormalization", "Flatten",
             "Reshape", "Concat", "Softmax", "LogSoftmax", "Dropout", "Identity", "Transpose", "Mul", "Gather")
ACTS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "LeakyRelu": "leakyrelu", "Elu": "elu",
        "Softplus": "softplus"}
RESERVED = {"network", "train", "init", "default", "true", "false", "same", "input"}


class _Layer:
    """One flowdsl layer being built: its call text, its input tensor(s), its parameters."""

    def __init__(self, name, text, src, joins=(), params=None, state=None, weighted=False):
        self.name, self.text, self.src, self.joins = name, text, src, list(joins)
        self.params, self.state = params or {}, state or {}
        self.weighted = weighted
        self.out = None     # the ONNX tensor this layer produces


class _Out:
    """A node seen through the output of the last node of its pattern."""

    def __init__(self, node, out):
        self.op_type, self.name, self.input, self.output, self.attribute = node.op_type, node.name, node.input, [out], []


def _attrs(node):
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _fail(node, opset, why):
    return FlowError(f"cannot import {node.op_type} node '{node.name or node.output[0]}' (opset {opset}): {why}")


def import_onnx(path, continue_joins=True):
    """(flow text, layers) for the ONNX file at path (layers: the imported layers with their
    ONNX weights, by name)."""
    try:
        import onnx
        from onnx import numpy_helper, shape_inference
    except ImportError:
        raise FlowError('importing ONNX needs the onnx package: pip install "flowdsl[onnx]"') from None
    try:
        model = onnx.load(str(path))
    except Exception as e:   # a truncated or foreign file: onnx raises DecodeError and friends
        raise FlowError(f"not an ONNX model ({type(e).__name__}: {e})", str(path)) from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    try:
        model = shape_inference.infer_shapes(model)
    except Exception as e:
        raise FlowError(f"ONNX shape inference failed: {e}", str(path)) from None
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1:
        raise FlowError(f"the graph has {len(inputs)} inputs; flowdsl imports networks with one", str(path))
    own = model.producer_name == "flowdsl"
    b = _Builder(consts, shapes, opset, own)
    b.continue_joins = continue_joins
    b._graph_nodes = list(g.node)
    for n in g.node:
        for t in n.input:
            b.consumers.setdefault(t, []).append(n)
    meta = {p.key: p.value for p in model.metadata_props}
    b.input_layer = meta.get("flowdsl.input_layer", "yes") == "yes"
    if "flowdsl.aliases" in meta:
        import json
        b.aliases = json.loads(meta["flowdsl.aliases"])
    for node in g.node:   # an op flowdsl has no layer for is the first thing to say
        if node.op_type not in SUPPORTED + ("Constant",):
            raise FlowError(f"cannot import {node.op_type} node '{node.name or node.output[0]}' (opset {opset}): "
                            f"flowdsl imports CNNs made of {', '.join(SUPPORTED)}", str(path))
    try:
        b.start(inputs[0].name)
        for node in g.node:
            if node.op_type != "Constant":
                b.node(node)
    except FlowError as e:
        raise FlowError(e.message, str(path)) from None
    if len(g.output) != 1:
        raise FlowError(f"the graph has {len(g.output)} outputs; flowdsl imports networks with one", str(path))
    return b.finish(g.output[0].name)


class _Builder:
    def __init__(self, consts, shapes, opset, own):
        self.consts, self.shapes, self.opset, self.own = consts, shapes, opset, own
        self.layers = []          # _Layer, in order
        self.of = {}              # ONNX tensor -> the _Layer producing it (None: the network input)
        self.layout = {}          # ONNX tensor -> "map" (NCHW), "vec", or ("perm", order) (a flattened map)
        self.names = set()
        self.ending = None        # the loss: softmax or squared
        self.skip = set()         # outputs of nodes a composite pattern already covers
        self.padded = {}          # tensor -> (pad, mode, source tensor): flowdsl's conv padding
        self.carried = {}         # tensor -> the notes of the padding Gathers, for the conv after them
        self.aliases = {}         # flowdsl's export: binding name -> its last layer's name
        self.consumers = {}       # tensor -> the nodes reading it

    # --- names ---------------------------------------------------------------------------------
    def name_for(self, node, kind):
        raw = node.output[0] if self.own else (node.name or node.output[0])
        if not self.own:   # PyTorch: "/layer1/0/conv1/Conv" -> layer1_0_conv1
            parts = [p for p in raw.split("/") if p]
            raw = "_".join(parts[:-1]) if len(parts) > 1 else (parts[0] if parts else "")
        name = re.sub(r"\W", "_", raw.split("/")[0] if self.own else raw).strip("_")
        if not name or name[0].isdigit() or name in RESERVED or _is_kind(name):
            name = f"{kind}_{len(self.layers) + 1}"
        base, k = name, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    # --- the graph ---------------------------------------------------------------------------------
    def start(self, name):
        s = self.shapes.get(name, ())
        self.input_name = name
        self.of[name] = None
        if len(s) == 4:
            self.input_nchw = (s[1], s[2], s[3])
            self.layout[name] = "map"
            self.nhwc_input = False
        elif len(s) == 2:
            self.input_vec = s[1]
            self.layout[name] = "vec"
        else:
            raise FlowError(f"the input has shape {s}; flowdsl imports (N, C, H, W), (N, H, W, C) or (N, D)")

    def hints(self, node):
        """flowdsl's export notes what the graph cannot say on a layer's first node."""
        d = getattr(node, "doc_string", "") or ""
        return [h.strip() for h in d[len("flowdsl:"):].split(",")] if self.own and d.startswith("flowdsl:") else []

    def add(self, layer, node, kind="map"):
        layer.out = node.output[0]
        if layer.weighted and "trainable=false" in self.hints(node) + self.carried.get(layer.src, []):
            layer.text = layer.text[:-1] + ", trainable=false)"
        self.layers.append(layer)
        self.of[layer.out] = layer
        self.layout[layer.out] = kind
        return layer

    def alias(self, node, src):
        """An op that changes nothing flowdsl sees (Identity, Dropout, a flatten of a vector)."""
        self.of[node.output[0]] = self.of[src]
        self.layout[node.output[0]] = self.layout[src]

    def const(self, node, i):
        if len(node.input) <= i or node.input[i] == "":
            return None
        name = node.input[i]
        if name not in self.consts:
            raise _fail(node, self.opset, f"input {i} ({name}) must be a constant (weights)")
        return np.asarray(self.consts[name], np.float32)

    def node(self, node):
        op, a = node.op_type, _attrs(node)
        x = node.input[0] if node.input else None
        if node.output[0] in self.skip:   # inside a pattern already imported (swish, gelu)
            return
        if op == "Transpose":
            if self.of.get(x, "?") is None and a.get("perm") == [0, 3, 1, 2] and len(self.shapes.get(x, ())) == 4:
                _, h, w, c = self.shapes[x]      # NHWC input behind a Transpose
                self.input_nchw, self.nhwc_input = (c, h, w), True
                self.alias(node, x)
                return
            if self.layout.get(x) == "map" and a.get("perm") == [0, 2, 3, 1]:   # NCHW -> NHWC before a Flatten
                self.alias(node, x)
                self.layout[node.output[0]] = "nhwc"
                return
            raise _fail(node, self.opset, "only a Transpose of the NHWC input to NCHW, or of a map to NHWC "
                                          "before a Flatten, is supported")
        if x not in self.layout:
            raise _fail(node, self.opset, f"its input {x} is not produced by a supported node")
        lay = self.layout[x]
        if op == "Identity":
            return self.alias(node, x)
        if op == "Dropout":   # kept as a layer (the identity in evaluation; fine-tuning uses it)
            ratio = self.consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("ratio", 0.5)
            p = float(str(np.float32(np.asarray(ratio))))   # 0.3, not 0.30000001192092896
            return self.add(_Layer(self.name_for(node, "dropout"), f"dropout(p={_num(p)})", x), node, lay)
        fused = self.composite(node, x)
        if fused is not None:      # swish or the tanh gelu, written out in several nodes
            kind, out = fused
            node = _Out(node, out)
            op = kind
        if op == "Gelu":
            if a.get("approximate", b"none") not in (b"tanh", "tanh"):
                raise _fail(node, self.opset, "only the tanh form of Gelu (approximate=\"tanh\") is flowdsl's gelu")
            op = "gelu"
        if op in ("gelu", "swish"):
            return self.activation(node, x, op, "", lay)
        if op == "Gather":
            return self.gather_pad(node, a, x)
        if op in ACTS:
            kind = ACTS[op]
            alpha = a.get("alpha")
            arg = f"(alpha={_num(alpha)})" if kind in ("leakyrelu", "elu") and alpha is not None else ""
            return self.activation(node, x, kind, arg, lay)
        return self.other(node, a, op, x, lay)

    def activation(self, node, x, kind, arg, lay):
        """An activation: the act= of the conv or dense before it where that folds, else a layer."""
        prev = self.of[x]
        if (prev is not None and prev.weighted and prev.text.endswith("act=linear)") and self._single(x)
                and (not self.own or prev.out.endswith("/z"))):
            prev.text = prev.text[:-len("act=linear)")] + f"act={kind}{arg})"
            self.of[node.output[0]] = prev
            self.layout[node.output[0]] = lay
            prev.out = node.output[0]
            return
        return self.add(_Layer(self.name_for(node, kind), f"{kind}{arg}", x), node, lay)

    def composite(self, node, x):
        """(kind, output tensor) when node starts swish (x * Sigmoid(x)) or flowdsl's written-out
        tanh gelu; the other nodes of the pattern are marked to skip."""
        cons = self.consumers
        if node.op_type == "Sigmoid":
            users = cons.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Mul" and set(users[0].input) == {x, node.output[0]}:
                self.skip.add(users[0].output[0])
                return "swish", users[0].output[0]
        if node.op_type == "Mul" and list(node.input) == [x, x]:
            # flowdsl's export: x2 = x*x, x3 = x2*x, ax3 = x3*a, inner = x+ax3, scaled = inner*c,
            # tanh, half = x*0.5, onept = tanh+1, y = half*onept
            base = node.output[0][:-len("/x2")] if node.output[0].endswith("/x2") else None
            parts = {f"{base}/{k}" for k in ("x3", "ax3", "inner", "scaled", "tanh", "half", "onept")}
            made = {n.output[0] for n in self._graph_nodes}
            if base is not None and parts | {base} <= made:
                self.skip |= parts | {base}
                return "gelu", base
        return None

    def gather_pad(self, node, a, x):
        """flowdsl's export of conv(pad_mode=...): Gather rows, Gather columns, Conv with no pads."""
        from .layers._padmodes import MODES, source_index
        rows = self.consts.get(node.input[1])
        nxt = self.consumers.get(node.output[0], [])
        if rows is None or a.get("axis") != 2 or len(nxt) != 1 or nxt[0].op_type != "Gather":
            raise _fail(node, self.opset, "a Gather is imported only as flowdsl's conv padding (rows, then columns)")
        g2 = nxt[0]
        cols = self.consts.get(g2.input[1])
        conv = self.consumers.get(g2.output[0], [])
        _, c, h, w = self.shapes[x]
        if cols is None or _attrs(g2).get("axis") != 3 or len(conv) != 1 or conv[0].op_type != "Conv":
            raise _fail(node, self.opset, "a Gather is imported only as flowdsl's conv padding (rows, then columns)")
        p = (len(rows) - h) // 2
        mode = next((m for m in MODES[2:] if np.array_equal(source_index(h, p, m), rows)
                     and np.array_equal(source_index(w, p, m), cols)), None)
        if mode is None:
            raise _fail(node, self.opset, "the Gather indices are none of flowdsl's padding modes")
        self.skip.add(g2.output[0])
        self.alias(node, x)
        self.alias(_Out(g2, g2.output[0]), node.output[0])
        self.padded[g2.output[0]] = (p, mode, x)
        self.carried[g2.output[0]] = self.hints(node)   # the conv's notes sit on its first node

    def other(self, node, a, op, x, lay):
        if op == "Conv":
            return self.conv(node, a, x)
        if op in ("Gemm", "MatMul"):
            return self.dense(node, a, x, lay)
        if op == "Add":
            return self.add_node(node, lay)
        if op in ("MaxPool", "AveragePool", "LpPool"):
            return self.pool(node, a, x)
        if op == "GlobalAveragePool":
            self._need_map(node, lay)
            return self.add(_Layer(self.name_for(node, "gap"), "globalavgpool", x), node, "gapmap")
        if op == "BatchNormalization":
            gamma, beta, mean, var = (self.const(node, i) for i in (1, 2, 3, 4))
            eps = float(str(np.float32(a.get("epsilon", 1e-5))))   # 1e-05, not 9.999999747378752e-06
            L = _Layer(self.name_for(node, "bn"), f"batchnorm(eps={_num(eps)})", x,
                       params={"gamma": gamma, "beta": beta}, state={"mean": mean, "var": var}, weighted=True)
            return self.add(L, node, lay)
        if op in ("Flatten", "Reshape"):
            return self.flatten(node, a, x, lay)
        if op == "Concat":
            if a.get("axis") != 1:
                raise _fail(node, self.opset, f"only a Concat along channels (axis 1) is supported; axis={a.get('axis')}")
            ins = list(node.input)
            if any(self.layout.get(i) not in ("map", "vec") for i in ins):
                raise _fail(node, self.opset, "its inputs must be maps or plain vectors")
            return self.add(_Layer(self.name_for(node, "concat"), "concat", ins[0], joins=ins), node, lay)
        if op in ("Softmax", "LogSoftmax"):
            if self.layout[x] != "vec":
                raise _fail(node, self.opset, "a softmax of a map is not a classifier's output")
            smooth = [h for h in self.hints(node) if h.startswith("smoothing=")]
            self.ending = (f"softmax({smooth[0]})" if smooth else "softmax", x, node.output[0])
            self.of[node.output[0]] = self.of[x]
            self.layout[node.output[0]] = "vec"
            return
        raise _fail(node, self.opset, "not supported")

    def _single(self, tensor):
        """Whether one node alone reads the tensor (an activation folds into act= only then)."""
        return len(self.consumers.get(tensor, [])) == 1

    def _need_map(self, node, lay):
        if lay not in ("map",):
            raise _fail(node, self.opset, "needs an image (N, C, H, W) input")

    def conv(self, node, a, x):
        self._need_map(node, self.layout[x])
        w, bias = self.const(node, 1), self.const(node, 2)
        k, c, fh, fw = w.shape
        if fh != fw:
            raise _fail(node, self.opset, f"flowdsl convs are square; this kernel is {fh}x{fw}")
        if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise _fail(node, self.opset, "grouped or dilated convolutions are not supported")
        st = a.get("strides", [1, 1])
        pads = a.get("pads", [0, 0, 0, 0])
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _fail(node, self.opset, "auto_pad is not supported (write explicit pads)")
        if st[0] != st[1] or len(set(pads)) != 1:
            raise _fail(node, self.opset, f"strides {st} and pads {pads} must be equal on every side")
        bias_arg = "" if bias is not None else ", bias=false"
        pad, mode = pads[0], ""
        if x in self.padded and pad == 0:   # the input was padded by flowdsl's Gathers
            pad, m, _ = self.padded[x]
            mode = f", pad_mode={m}"
        if "pad=same" in self.hints(node) + self.carried.get(x, []) and fh % 2 and pad == (fh - 1) // 2:
            pad = "same"
        text = f"conv(filters={k}, field={fh}, stride={st[0]}, pad={pad}{mode}{bias_arg}, act=linear)"
        params = {"w": np.ascontiguousarray(w.transpose(2, 3, 1, 0))}
        if bias is not None:
            params["b"] = bias
        return self.add(_Layer(self.name_for(node, "conv"), text, x, params=params, weighted=True), node, "map")

    def dense(self, node, a, x, lay):
        w = self.const(node, 1)
        if node.op_type == "Gemm":
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise _fail(node, self.opset, "only Gemm with alpha = beta = 1 and an untransposed input")
            if a.get("transB", 0):
                w = w.T
            bias = self.const(node, 2)
        else:
            bias = None
        if lay == "map":
            raise _fail(node, self.opset, "a dense layer needs a Flatten of the map before it")
        if isinstance(lay, tuple):   # a flattened NCHW map: rows to flowdsl's NHWC order
            w = w[lay[1]]
        units = w.shape[1]
        bias_arg = "" if bias is not None else ", bias=false"
        params = {"w": np.ascontiguousarray(w)}
        if bias is not None:
            params["b"] = bias.reshape(-1)
        return self.add(_Layer(self.name_for(node, "dense"), f"dense(units={units}{bias_arg}, act=linear)", x,
                               params=params, weighted=True), node, "vec")

    def add_node(self, node, lay):
        x, y = node.input[0], node.input[1]
        if y in self.consts or x in self.consts:   # MatMul + Add(bias): the dense layer's bias
            src, bias = (x, self.consts[y]) if y in self.consts else (y, self.consts[x])
            prev = self.of.get(src)
            if prev is not None and prev.text.startswith("dense(") and "bias=false" in prev.text:
                prev.params["b"] = np.asarray(bias, np.float32).reshape(-1)
                prev.text = prev.text.replace(", bias=false", "")
                self.of[node.output[0]] = prev
                self.layout[node.output[0]] = self.layout[src]
                prev.out = node.output[0]
                return
            raise _fail(node, self.opset, "an Add of a constant is supported only as a MatMul's bias")
        if self.layout.get(x) not in ("map", "vec") or self.layout.get(y) not in ("map", "vec"):
            raise _fail(node, self.opset, "its inputs must be maps or plain vectors")
        return self.add(_Layer(self.name_for(node, "add"), "add", x, joins=[x, y]), node, self.layout[x])

    def pool(self, node, a, x):
        self._need_map(node, self.layout[x])
        k, st = a["kernel_shape"], a.get("strides", [1, 1])
        pads = a.get("pads", [0, 0, 0, 0])
        if k[0] != k[1] or st[0] != st[1]:
            raise _fail(node, self.opset, f"pool windows and strides must be square; {k}, {st}")
        if pads[0] != pads[1] or pads[2] != pads[3] or pads[2] < pads[0]:
            raise _fail(node, self.opset, f"pads {pads} are not a flowdsl pool's (pad before, pad or more after)")
        kind = {"MaxPool": "maxpool", "AveragePool": "avgpool", "LpPool": "l2pool"}[node.op_type]
        if node.op_type == "LpPool" and a.get("p", 2) != 2:
            raise _fail(node, self.opset, f"only LpPool with p=2 (l2pool); p={a.get('p')}")
        if node.op_type == "AveragePool" and pads != [0, 0, 0, 0] and not a.get("count_include_pad", 0) == 0:
            raise _fail(node, self.opset, "AveragePool with count_include_pad=1 and padding is not supported")
        p = pads[0]
        ceil = bool(a.get("ceil_mode", 0)) or pads[2] > p
        text = f"{kind}(size={k[0]}, stride={st[0]}, ceil={'true' if ceil else 'false'}" + (f", pad={p})" if p else ")")
        return self.add(_Layer(self.name_for(node, kind), text, x), node, "map")

    def flatten(self, node, a, x, lay):
        s = self.shapes.get(node.output[0], ())
        if len(s) != 2 or (node.op_type == "Flatten" and a.get("axis", 1) != 1):
            raise _fail(node, self.opset, f"only a flatten to (N, D) is supported; output shape {s}")
        if lay == "nhwc" and self.own and not node.output[0].endswith("/flat"):   # a flatten layer of the source
            return self.add(_Layer(self.name_for(node, "flatten"), "flatten", x), node, "vec")
        if lay in ("vec", "gapmap", "nhwc") or isinstance(lay, tuple):
            self.alias(node, x)   # an NHWC map flattens in flowdsl's own order
            self.layout[node.output[0]] = "vec" if lay in ("gapmap", "nhwc") else lay
            return
        c, h, w = self.shapes[x][1:]
        # flowdsl flattens NHWC: its index (i, j, ch) holds ONNX's element ch*H*W + i*W + j
        order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        self.alias(node, x)
        self.layout[node.output[0]] = ("perm", order)

    # --- writing -----------------------------------------------------------------------------------
    def finish(self, output):
        lay = self.layout.get(output)
        if isinstance(lay, tuple):
            raise FlowError("the output is a flattened map with no dense layer after it (flowdsl flattens "
                            "in NHWC order, ONNX in NCHW): not supported")
        loss = self.ending[0] if self.ending is not None and self.ending[2] == output else "squared"
        return _write(self, self.of.get(output), loss, self.continue_joins)


def _write(b, last, loss, continue_joins=True):
    """(.flow text, layers): weighted layers bound by name; the network as chains, where a layer
    continues the chain of its source when nothing else reads that source; a chain whose end
    is read elsewhere (a branch point, a join's input) is bound under its last layer's name."""
    layers = b.layers
    src = {id(L): (b.of[L.src] if L.src is not None else None) for L in layers}
    joins = {id(L): [b.of[t] for t in L.joins] for L in layers}
    uses, referenced = {}, set()
    for L in layers:
        for q in (joins[id(L)] or [src[id(L)]]):
            uses[id(q)] = uses.get(id(q), 0) + 1
    # a join whose first input has no other use continues that input's chain (`... :: add(from=s3)`);
    # the others start a chain of their own (`concat(a, b)`)
    cont = set()
    if continue_joins:
        for L in layers:
            q0 = joins[id(L)][0] if joins[id(L)] else None
            if q0 is not None and uses[id(q0)] == 1 and joins[id(L)].count(q0) == 1:
                cont.add(id(L))
    for L in layers:
        js = joins[id(L)][1:] if id(L) in cont else joins[id(L)]
        referenced |= {id(q) for q in js}
    if last is None:
        raise FlowError("the graph computes nothing flowdsl can import (its output is its input)")
    uses[id(last)] = uses.get(id(last), 0) + 1
    chains, chain_of = [], {}
    for L in layers:
        q = src[id(L)]
        if (not L.joins or id(L) in cont) and q is not None and uses[id(q)] == 1 and id(q) not in referenced:
            chain_of[id(q)].append(L)
            chain_of[id(L)] = chain_of[id(q)]
        else:
            chain_of[id(L)] = [L]
            chains.append(chain_of[id(L)])
    final = chain_of[id(last)]
    taken = {L.name for L in layers}
    bound = {}
    for c in chains:
        if c is not final:
            # not the last layer's own name: that stays the layer's (and no automatic name is taken);
            # flowdsl's own export says what the source called it
            name = next((a for a, last in b.aliases.items() if last == c[-1].name and a not in taken),
                        f"{c[-1].name}_out")
            while name in taken:
                name += "_"
            bound[id(c)] = name
            taken.add(name)
    c, h, w = b.input_nchw if hasattr(b, "input_nchw") else (None, None, None)
    first = f"input({w}x{h}x{c})" if c is not None else f"input({b.input_vec})"
    shared_input = uses.get(id(None), 0) > 1 or id(None) in referenced
    inp = "inp" if "inp" not in taken else "network_input"

    def ref(q):
        if q is None:
            return inp if shared_input else first
        return bound[id(chain_of[id(q)])]

    if not shared_input and not b.input_layer and layers and layers[0].weighted and src[id(layers[0])] is None:
        # written `conv(28x28x1, ...)` in the source (flowdsl's export says so): the shape goes there
        L0 = layers[0]
        L0.text = L0.text.replace("(", f"({first[len('input('):-1]}, ", 1)
        first = None
    lines = [f"{L.name} = {L.text}" for L in layers if L.weighted]
    if shared_input:
        lines.append(f"{inp} = {first}")
    text = {id(L): (L.name if L.weighted else L.text) for L in layers}
    for L in layers:
        if id(L) in cont:
            names = ", ".join(ref(q) for q in joins[id(L)][1:])
            text[id(L)] = f"add(from={names})" if L.text == "add" and len(joins[id(L)]) == 2 else f"{L.text}({names})"
    body = {}
    for ch in chains:
        L = ch[0]
        if L.joins and id(L) not in cont:
            kind = "concat" if L.text == "concat" else "add"
            head = [f"{kind}({', '.join(ref(q) for q in joins[id(L)])})"]
            rest = ch[1:]
        else:
            head = [ref(src[id(L)])] if ref(src[id(L)]) is not None else []
            rest = ch
        body[id(ch)] = head + [text[id(M)] for M in rest]
    for ch in chains:
        if ch is not final:
            lines.append(f"{bound[id(ch)]} = {' :: '.join(body[id(ch)])}")
    lines.append(f"network = {' :: '.join(body[id(final)] + [loss])}")
    return "\n".join(lines) + "\n", layers


def to_model(path):
    """(Model, Net) of an ONNX file: the .flow text built, checked against ONNX's shapes, the
    weights and batchnorm statistics in place."""
    from .model import build_text
    from .net import Net
    text, layers = import_onnx(path)
    try:
        model = build_text(text, str(path) + ".flow")
    except FlowError as e:
        if "is not built before" not in e.message:
            raise FlowError(f"the imported network does not build in flowdsl: {e.message}", str(path)) from None
        # a join continued a chain before the branch it names was built: every join starts a chain
        text, layers = import_onnx(path, continue_joins=False)
        model = build_text(text, str(path) + ".flow")
    net = Net(model, seed=0)
    for L in layers:
        for k, v in L.params.items():
            dst = net.params[L.name][k]
            if dst.shape != v.shape:
                raise FlowError(f"{L.name}.{k}: ONNX gives {v.shape}, the layer needs {dst.shape}", str(path))
            dst[...] = v
        for k, v in L.state.items():
            net.state[L.name][k][...] = v
    return model, net, text


def _num(v):
    """A float from ONNX (float32) as the number it was written as: 0.2, not 0.20000000298023224."""
    from .args import fmt
    return fmt(float(str(np.float32(v))))


def _is_kind(name):
    from . import layers as registry
    return registry.lookup(name, False) is not None or registry.lookup(name, True) is not None
