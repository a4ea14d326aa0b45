"""Slow, obviously correct float64 references for every registered layer kind, and the table of
examples the layer tests run them on.

A reference is `ref(layer, x, params, training, state=None) -> y` with x float64 NHWC (N, H, W, C)
for maps or (N, D) for vectors, params {name: float64 array}, and state the layer's buffers
(batchnorm's running statistics) for evaluation. Weight layouts: conv w is
(field, field, C_in, filters); dense w is (D_in, units) with the input flattened in NHWC order.

These deliberately share no code with flowdsl's kernels: the shape rules of the pools are
written as "slide the window until it reaches the end" instead of the closed formula."""
import math

import numpy as np

# --------------------------------------------------------------------------- activations
ACTS = {
    "linear": lambda z, a: z,
    "relu": lambda z, a: np.where(z > 0, z, 0.0),
    "gelu": lambda z, a: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))),
    "sigmoid": lambda z, a: 1 / (1 + np.exp(-z)),
    "tanh": lambda z, a: np.tanh(z),
    "leakyrelu": lambda z, a: np.where(z > 0, z, a * z),
    "elu": lambda z, a: np.where(z > 0, z, a * (np.exp(np.minimum(z, 0)) - 1)),
    "softplus": lambda z, a: np.log1p(np.exp(z)),
    "swish": lambda z, a: z / (1 + np.exp(-z)),
}


def activation(name, alpha, z):
    return ACTS[name](z, alpha)


def _act_of(layer):
    a = layer.args["act"]
    return a.name, a.get("alpha", 0.0) or 0.0


def ref_activation(layer, x, params, training, state=None):
    return activation(layer.kind, layer.args.get("alpha", 0.0), x)


# --------------------------------------------------------------------------- layers
def ref_input(layer, x, params, training, state=None):
    return x


def ref_flatten(layer, x, params, training, state=None):
    return x.reshape(x.shape[0], -1)


def ref_conv(layer, x, params, training, state=None):
    f, s, k = layer.args["field"], layer.args["stride"], layer.args["filters"]
    pad = (f - 1) // 2 if layer.args["pad"] == "same" else layer.args["pad"]
    w, b = params["w"], params.get("b", np.zeros(k))     # bias=false: no "b"
    n, h, wd, c = x.shape
    assert w.shape == (f, f, c, k)
    # numpy's names for scipy.ndimage's modes: nearest a a|a b, mirror c b|a b c, reflect b a|a b, wrap
    mode = {None: "constant", "zeros": "constant", "constant": "constant", "nearest": "edge",
            "mirror": "reflect", "reflect": "symmetric", "wrap": "wrap"}[layer.args.get("pad_mode")]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    oh = (h + 2 * pad - f) // s + 1
    ow = (wd + 2 * pad - f) // s + 1
    z = np.zeros((n, oh, ow, k))
    for q in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = xp[q, i * s:i * s + f, j * s:j * s + f, :]
                for kk in range(k):
                    z[q, i, j, kk] = np.sum(patch * w[:, :, :, kk]) + b[kk]
    return activation(*_act_of(layer), z)


def ref_dense(layer, x, params, training, state=None):
    x2 = x.reshape(x.shape[0], -1)
    z = x2 @ params["w"] + params.get("b", 0.0)
    return activation(*_act_of(layer), z)


def window_starts(n, size, stride, ceil, pad=0):
    """Starts of the pooling windows along an axis of length n, in input coordinates (a window
    may begin in the left padding, -pad): slide until a window reaches the end of the right
    padding (ceil: a last window may hang over it, and must start inside the input) or would
    leave it."""
    starts = [-pad]
    while True:
        nxt = starts[-1] + stride
        if ceil:
            if starts[-1] + size >= n + pad or nxt >= n:
                break
        elif nxt + size > n + pad:
            break
        starts.append(nxt)
    return starts


def _pool(layer, x, reduce):
    """reduce(values) over each window's input pixels (padding holds none: max pads with -inf,
    avg counts only the input pixels, l2 adds nothing for it)."""
    k, s, ceil = layer.args["size"], layer.args["stride"] or layer.args["size"], layer.args["ceil"]
    pad = layer.args.get("pad") or 0
    n, h, w, c = x.shape
    rows, cols = window_starts(h, k, s, ceil, pad), window_starts(w, k, s, ceil, pad)
    y = np.zeros((n, len(rows), len(cols), c))
    for q in range(n):
        for i, r0 in enumerate(rows):
            for j, c0 in enumerate(cols):
                for cc in range(c):
                    win = x[q, max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w), cc]
                    assert win.size, "a window holds no input pixel"
                    y[q, i, j, cc] = reduce(win)
    return y


def ref_maxpool(layer, x, params, training, state=None):
    return _pool(layer, x, np.max)


def ref_avgpool(layer, x, params, training, state=None):
    return _pool(layer, x, np.mean)


def ref_l2pool(layer, x, params, training, state=None):
    return _pool(layer, x, lambda v: np.sqrt(np.sum(v * v)))


def ref_globalavgpool(layer, x, params, training, state=None):
    return x.mean(axis=(1, 2))


def ref_dropout(layer, x, params, training, state=None):
    """Evaluation only (the identity); training draws a random mask, tested separately."""
    assert not training or layer.args["p"] == 0.0, "dropout in training is random: no reference"
    return x


def ref_batchnorm(layer, x, params, training, state=None):
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    if training:
        mean = x2.mean(axis=0)
        var = ((x2 - mean) ** 2).mean(axis=0)
    else:
        mean, var = state["mean"], state["var"]
    y = (x2 - mean) / np.sqrt(var + layer.args["eps"]) * params["gamma"] + params["beta"]
    return y.reshape(x.shape)


def ref_softmax(layer, x, params, training, state=None):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_squared(layer, x, params, training, state=None):
    return x


def ref_add(layer, x, params, training, state=None, extras=None):
    assert extras and all(e.shape == x.shape for e in extras), "add needs the outputs of its sources"
    return x + sum(extras)


def ref_concat(layer, x, params, training, state=None, extras=None):
    return np.concatenate([x] + list(extras), axis=-1)


REFERENCES = {
    "input": ref_input,
    "conv": ref_conv,
    "dense": ref_dense,
    "flatten": ref_flatten,
    "maxpool": ref_maxpool,
    "avgpool": ref_avgpool,
    "l2pool": ref_l2pool,
    "globalavgpool": ref_globalavgpool,
    "dropout": ref_dropout,
    "batchnorm": ref_batchnorm,
    "softmax": ref_softmax,
    "squared": ref_squared,
    **{a: ref_activation for a in ACTS},
    "add": ref_add,
    "concat": ref_concat,
}


def reference(layer, x, params, training, state=None, extras=None):
    """extras: for a layer with sources (add, concat), the source layers' outputs."""
    if layer.inputs():
        return REFERENCES[layer.kind](layer, x, params, training, state, extras=extras)
    return REFERENCES[layer.kind](layer, x, params, training, state)


# --------------------------------------------------------------------------- losses
def loss_softmax(layer, z, labels):
    """Mean cross-entropy of softmax(z) against integer labels, each smoothed to the target
    distribution (1 - s) * one_hot + s / classes (s = the layer's smoothing)."""
    s = layer.args["smoothing"]
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    total = 0.0
    for r in range(len(labels)):
        for k in range(z.shape[1]):
            q = (1 - s) * (k == labels[r]) + s / z.shape[1]
            total -= q * logp[r, k]
    return total / len(labels)


def loss_squared(layer, z, targets):
    return 0.5 * np.sum((z - targets.reshape(z.shape)) ** 2) / z.shape[0]


LOSSES = {"softmax": loss_softmax, "squared": loss_squared}


def network_loss(model, x, params, targets, training=True, states=None):
    """The whole model's loss in float64: every layer's reference in turn, then the loss.
    params: {layer name: {param: float64 array}}."""
    outs = {model.layers[0].name: x}  # every layer's output, for branches and skip connections
    layers = [l for l in model.layers if l.role != "input"]
    for l in layers[:-1]:
        if l.feed is not None:       # a branch's first layer (or a concat that starts a chain)
            x = outs[l.feed.name]
        extras = [outs[s.name] for s in l.inputs()]
        x = reference(l, x, params.get(l.name, {}), training, (states or {}).get(l.name), extras=extras)
        outs[l.name] = x
    return LOSSES[layers[-1].kind](layers[-1], x, targets)


# --------------------------------------------------------------------------- examples
# kind -> [(layer text, input shape as written: WxHxC or N)]. Maps are not square, so a swapped
# width and height shows. Every registered kind must appear (the tests fail otherwise).
EXAMPLES = {
    "input": [("input", "5x4x2"), ("input", "7")],
    "conv": [
        ("conv(filters=1, field=3)", "6x5x1"),                       # direct path
        ("conv(filters=3, field=3, stride=2, pad=1)", "7x5x2"),      # direct, strided, padded
        ("conv(filters=2, field=1, act=relu)", "4x3x3"),             # 1x1
        ("conv(filters=4, field=3, pad=same, act=gelu)", "5x6x2"),   # direct, largest count
        ("conv(filters=5, field=3, pad=same, act=tanh)", "5x4x3"),   # planar, three channels
        ("conv(filters=6, field=2, stride=2, act=leakyrelu(alpha=0.1))", "6x4x2"),
        ("conv(filters=7, field=5, stride=3, pad=2, act=elu(alpha=0.5))", "7x4x2"),
        ("conv(filters=8, field=3, pad=2, act=sigmoid)", "4x3x1"),    # planar, pad wider than needed
        ("conv(filters=3, field=4, act=softplus)", "5x6x2"),          # even field
        ("conv(filters=2, field=2, stride=3)", "8x5x1"),             # stride > field: gaps
        ("conv(filters=5, field=1, stride=2, pad=1)", "5x3x2"),      # border outputs see only pad
        ("conv(filters=5, field=3)", "3x3x2"),                       # field = input: 1x1 output (planar)
        ("conv(filters=6, field=3, pad=same, act=relu)", "5x4x9"),  # NHWC im2col; dx by flipped conv
        ("conv(filters=9, field=2)", "5x4x9"),                       # even field, flipped-conv dx
        ("conv(filters=5, field=3, pad=1)", "6x5x9"),                # dx flipped conv, K < TALL_BELOW_C
        ("conv(filters=5, field=2, pad=2)", "4x3x8"),                # pad > field-1: col2im dx
        ("conv(filters=6, field=5, pad=1)", "7x6x1"),                # planar 5x5 rows, dx by col2im (K > C)
        ("conv(filters=6, field=2, pad=2)", "5x4x1"),                # tall columns (pad > field-1), col2im dx
        ("conv(filters=11, field=3, pad=same, act=relu)", "6x5x1"),  # planar: two filter groups
        ("conv(filters=10, field=4, pad=3)", "5x6x2"),               # planar: any field, pad = field-1
        ("conv(filters=9, field=5, pad=2, act=leakyrelu(alpha=0.1))", "7x6x8"),  # planar, most channels
        ("conv(filters=5, field=3, stride=2, pad=1)", "7x5x1"),      # one-channel tall columns, strided
        ("conv(filters=5, field=3, act=relu)", "7x6x12"),            # Winograd: pad 0, odd output
        ("conv(filters=6, field=3, pad=2)", "5x6x13"),               # Winograd: pad 2
        ("conv(filters=7, field=3, pad=same)", "3x3x16"),            # Winograd: one tile row
        ("conv(filters=8, field=3, pad=same, act=gelu)", "4x7x12"),  # Winograd: even x odd tiles
        ("conv(filters=5, field=3, act=relu)", "7x6x32"),            # F(4x4): pad 0, partial tiles
        ("conv(filters=6, field=3, pad=1)", "9x5x33"),               # F(4x4): three tiles across
        ("conv(filters=7, field=3, pad=2)", "4x3x32"),               # F(4x4): pad 2, one tile
        ("conv(filters=5, field=5, act=relu)", "7x6x16"),            # F(2x2, 5x5): pad 0, partial tiles
        ("conv(filters=6, field=5, pad=same)", "5x6x17"),            # F(2x2, 5x5): pad 2
        ("conv(filters=5, field=5, pad=4, bias=false)", "3x4x16"),   # F(2x2, 5x5): pad 4, no bias
        ("conv(filters=2, field=3, stride=2)", "6x7x1"),             # stride leaves a row and a column unread
        ("conv(filters=6, field=3, stride=2, pad=1)", "8x6x3"),      # gemm, unread border
        ("conv(filters=5, field=2, stride=3, pad=1)", "7x8x9"),      # gemm, unread border
        ("conv(filters=2, field=3, pad=1, bias=false)", "5x4x2"),     # rows, no bias
        ("conv(filters=1, field=4, stride=2, pad=1, act=relu)", "8x7x1"),  # rows: net C's c2, relu fused
        ("conv(filters=3, field=3, stride=2, pad=1, act=relu)", "7x6x3"),  # rows: strided phases, 3 channels
        ("conv(filters=2, field=2, pad=2)", "4x5x3"),                 # rows: border outputs read only padding
        ("conv(filters=1, field=3, stride=3, pad=2, act=relu)", "7x8x2"),  # rows: stride = field, wide pad
        ("conv(filters=6, field=3, pad=1, bias=false, act=relu)", "5x4x3"),  # planar, no bias
        ("conv(filters=6, field=3, bias=false, trainable=false)", "6x5x12"),  # Winograd, no bias
        ("conv(filters=6, field=2, stride=2, bias=false)", "6x4x9"),  # gemm, no bias
        ("conv(filters=2, field=3, pad=1, pad_mode=nearest)", "5x4x2"),   # rows
        ("conv(filters=6, field=3, pad=same, pad_mode=mirror, act=relu)", "5x4x3"),  # planar
        ("conv(filters=5, field=5, pad=3, pad_mode=reflect)", "4x5x2"),  # planar, pad > half the input
        ("conv(filters=7, field=3, pad=1, pad_mode=wrap)", "5x6x12"),  # Winograd
        ("conv(filters=6, field=3, stride=2, pad=2, pad_mode=mirror)", "7x6x9"),  # gemm
        ("conv(filters=3, field=3, pad=1, pad_mode=constant)", "4x4x1"),  # zeros by another name
        ("conv(filters=6, field=3, pad=4, pad_mode=wrap)", "3x2x1"),  # wraps round more than once
    ],
    "dense": [
        ("dense(4)", "3x2x2"),                      # flattens a map in NHWC order
        ("dense(3, act=tanh)", "6"),
        ("linear(1, act=relu)", "5"),
        ("dense(7, act=gelu)", "2x3x2"),
        ("dense(4, act=silu)", "3x2x2"),
        ("dense(3, bias=false, act=tanh)", "5"),
        ("dense(2, trainable=false)", "3x2x1"),
    ],
    "flatten": [("flatten", "3x4x2")],
    "maxpool": [
        ("maxpool", "6x4x2"),
        ("maxpool", "7x5x20"),                       # 2x2 inside an odd input (its last row and column unread)
        ("maxpool(2, ceil=true)", "5x7x2"),          # partial last windows both ways
        ("max2d(3, stride=2)", "7x5x2"),             # overlapping
        ("maxpool(3, stride=2, ceil=true)", "8x6x3"),  # overlapping and partial
        ("maxpool(2, stride=3, ceil=true)", "7x6x1"),  # gaps between windows
        ("maxpool(3, stride=1)", "5x4x2"),
        ("maxpool(3, stride=1, pad=1)", "5x4x2"),    # keeps the size (Inception's pool branch)
        ("maxpool(2, pad=1)", "5x6x2"),
        ("maxpool(3, stride=2, pad=1, ceil=true)", "8x7x2"),
        ("maxpool(4, stride=3, pad=2)", "9x7x1"),    # overlap, pad 2
    ],
    "avgpool": [
        ("avgpool", "6x4x2"),
        ("avgpool(2, ceil=true)", "5x7x2"),
        ("avgpool(3, stride=2)", "7x5x2"),
        ("avgpool(3, stride=2, ceil=true)", "8x6x3"),
        ("avg2d(2, stride=3, ceil=true)", "7x6x1"),
        ("avgpool(3, stride=1)", "5x4x2"),
        ("avgpool(3, stride=1, pad=1)", "5x4x2"),    # count_include_pad=false
        ("avgpool(2, pad=1, ceil=true)", "5x6x2"),
        ("avgpool(4, stride=3, pad=2)", "9x7x1"),
    ],
    "l2pool": [
        ("l2pool", "6x4x2"),
        ("l2pool(3, stride=2)", "7x5x2"),
        ("l2pool(2, ceil=true)", "5x7x1"),
        ("l2pool(3, stride=1, pad=1)", "5x4x3"),
    ],
    "globalavgpool": [("globalavgpool", "5x4x3"), ("gap", "3x6x2")],
    "dropout": [("dropout", "5x4x3"), ("dropout(0.25)", "9"), ("dropout(p=0)", "4x3x2")],
    "batchnorm": [
        ("batchnorm", "4x3x3"),
        ("batchnorm(momentum=0.5, eps=0.001)", "5"),
        ("bn", "2x2x1"),
        ("batchnorm(trainable=false)", "3x2x2"),
    ],
    "softmax": [("softmax", "4"), ("crossentropy", "2"), ("softmax(smoothing=0.1)", "5"),
                ("softmax(0.9)", "3")],
    "squared": [("squared", "3"), ("mse", "1")],
    "relu": [("relu", "5x4x2"), ("relu", "6")],
    "gelu": [("gelu", "5x4x2")],
    "sigmoid": [("sigmoid", "7")],
    "tanh": [("tanh", "3x2x2")],
    "linear": [("linear", "6"), ("identity", "2x2x2")],
    "leakyrelu": [("leakyrelu", "5x4x1"), ("leakyrelu(alpha=0.3)", "6")],
    "elu": [("elu", "5x4x2"), ("elu(alpha=0.4)", "6")],
    "softplus": [("softplus", "3x3x2")],
    "swish": [("swish", "5x4x2"), ("silu", "6")],
    # the layer tests build `input(shape) :: <layer> :: squared`, so the source is the input
    "add": [("add(input1)", "5x4x2"), ("shortcut(from=input1)", "6"), ("add(input1, input1)", "3x2x2")],
    "concat": [("concat(input1)", "5x4x2"), ("concat(input1, input1)", "3x2x1"), ("concatenate(from=[input1])", "6")],
}
