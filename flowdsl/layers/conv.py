"""conv(WxHxC?, filters=1, field=3, stride=1, pad=0|same, act=linear,
     pad_mode=zeros|nearest|mirror|reflect|wrap, bias=true, trainable=true)

Square `field` x `field` filters over all input channels, one learned bias per filter (none with
bias=false: a conv followed by batchnorm has no use for one). trainable=false: fixed filters.
Shape rule: W' = floor((W + 2*pad - field) / stride) + 1, same for H (as PyTorch and Keras: a
stride that does not tile the input leaves its last rows/columns unread; `check` notes them).
pad_mode (scipy.ndimage's meanings, _padmodes.py): zeros (alias constant) is done inside each
algorithm; the others pad a copy of the input and run the algorithm with pad=0 on it.

Weights are stored (field, field, C_in, filters) so that, with channels-last activations, a
convolution is one matrix product: im2col rows of length field*field*C_in times the weights.
This file holds the arguments, the shape rule and the choice of algorithm; each algorithm is a
module of its own with the same interface (described in _rows.py), in STRATEGIES:
- "rows" (_rows.py), few filters (NeuroFlow's 1-filter convs on 400x400 images): direct loops
  on the unpadded input, no im2col buffer, relu fused in (forward_fused asks `RELU`);
- "winograd" (_winograd.py), 3x3 stride-1 filters over at least WINO_MIN_C input channels:
  Winograd F(2x2, 3x3), 2.25x fewer multiplications than im2col; from WINO4_MIN_C channels
  "winograd4" (_winograd4.py), F(4x4, 3x3), 4x fewer; 5x5 stride-1 filters over at least
  WINO25_MIN_C channels "winograd25" (_winograd25.py), F(2x2, 5x5), 2.8x fewer;
- "planar" (_planar.py), stride-1 filters over at most PLANAR_MAX_C input channels (first
  layers): multiply-adds of shifted, padded input planes; in evaluation it can apply a following
  maxpool before the output is written (flowdsl.plan asks `can_pool`);
- "gemm" (_gemm.py), otherwise: numba im2col and one BLAS product.
Measured choices: the constants below, bench/ and docs/internals.md; `flowdsl bench` names the
one each conv runs.
"""
import os

import numpy as np

from . import _gemm, _padmodes, _planar, _rows, _winograd, _winograd4, _winograd25
from ..layers import activation_table, register
from .activations import act_backward, act_forward, act_spec
from .base import BIAS, TRAINABLE, Layer, LayerError, P, biased, need_map, show_shape

STRATEGIES = {"rows": _rows, "planar": _planar, "gemm": _gemm, "winograd": _winograd, "winograd4": _winograd4,
              "winograd25": _winograd25}
WINOGRADS = (_winograd, _winograd4, _winograd25)
DIRECT_MAX_FILTERS = 4   # at or below this many filters: "rows"
CHUNK_FLOATS = 1 << 20   # evaluation: im2col (or Winograd tile) buffers of about this many floats (4 MB)
WINO_MIN_C = 12          # 3x3 stride-1 convs with at least this many input channels: Winograd
                         # (a training step at batch 64, 28x28, 8 -> 16 channels: im2col 32 ms,
                         # Winograd 35; 12 -> 12: 38 and 33; 16 -> 32: 52 and 40),
PLANAR_MAX_C = 8         # stride-1 convs over at most this many input channels: "planar" (a
                         # forward and weight gradient at batch 64, 28x28: 1 -> 20 5x5 im2col
                         # 2.0 ms, planar 1.6; 1 -> 32 3x3 2.1 and 1.8; 3 -> 16 3.0 and 1.9;
                         # 8 -> 16 4.3 and 3.9; but 20 -> 40 5x5 at 12x12: 2.7 and 6.1)
WINO4_MIN_C = 32         # F(4x4, 3x3) from this many input channels (forward + backward at
                         # batch 64, against F(2x2): 24 -> 64 at 14x14 0.84x as fast, 32 -> 64
                         # at 13x13 1.16x, 64 -> 128 at 6x6 1.24x, 96 -> 96 at 7x7 1.45x)
WINO25_MIN_C = 16        # 5x5 stride-1 convs over at least this many input channels: F(2x2, 5x5)
                         # (a training step of input :: conv :: dense(10) at batch 64 against
                         # gemm, interleaved, 2026-12-03: 12x12x12 -> 40 same 0.83-0.88x,
                         # x16 1.02x, 28x28x16 -> 32 1.09x, 14x14x16 -> 32 1.24x, 8x8x64 -> 64
                         # 1.38x; net B, 12x12x20 -> 40: the whole step 1.25x)
WIDE = None              # whether numpy's BLAS runs AVX-512 kernels (see wide_vectors)
WIDE_PLANAR_MAX_C = 1    # with AVX-512 BLAS, evaluation still runs "planar" for stride-1 convs
WIDE_PLANAR_MIN_FIELD = 3  # over at most this many input channels with fields at least this wide (net B's
                         # 28x28x1 -> 20 5x5, its maxpool fused: the whole pass 1.12-1.75x at
                         # batch 16-256 against gemm, interleaved; A's 1 -> 32 3x3 1.04-1.45x once
                         # planar ran four filters a pass, 0.94-1.08x before)
WIDE_WINO_MIN_TILES = 1024  # with AVX-512 BLAS, evaluation runs Winograd for batches of at
                         # least this many 2x2 output tiles, gemm below (2026-12-03, once the transforms were
                         # 3-6x faster: net A, batch 256 1.38x gemm's speed, 64 1.04-1.16x, 32
                         # 1.0-1.2x, 16 0.76-0.94x; fashion.flow at 256 1.11x, fashion_res 1.18x;
                         # in-process alternations, medians)
WIDE_WINO25_MIN_C = 32   # and F(2x2, 5x5) there from this many input channels, gemm (its maxpool
                         # fused) below: 2 threads, batch 256, interleaved (2026-12-07, AVX-512 Zen
                         # 4): net B's 12x12x20 -> 40 ran 1.13-1.19x faster as gemm (one thread:
                         # level), 12x12x24 -> 48 1.06x, x32 -> 40 1.03x, x20 -> 64 level; 16x16x32
                         # -> 64 (pad 2) 1.10x faster as Winograd
WINO_MIN_TILES = 128     # for batches of at least this many 2x2 output tiles (hello-dl net, a
                         # training step: at batch 1, 36 and 4 tiles, im2col 3.2 ms, Winograd
                         # 5.7; level at batch 8; Winograd ahead at 64, its conv3's 256 tiles too)


def wide_vectors():
    """Whether the products run in numpy's BLAS with AVX-512 (16-wide) kernels here
    (blas.wide_kernels: the CPU has AVX-512 and OpenBLAS's kernel set is one of its AVX-512
    sets; and not blas.own_products, flowdsl's own kernel, which AVX-512 CPUs run by default
    and with which the narrow rules won: net A at batch 256, OpenBLAS's SkylakeX kernels on a
    Zen 5, 2 threads: wide rules and BLAS 32,537 img/s, narrow rules and own kernel 42,078;
    B 55,638 and 59,385; 2026-12-07). There the im2col product
    ("gemm", each thread its own share) beat Winograd and "planar" on every conv of the bench
    nets in evaluation (2026-12-02, net A at batch 256: 13,766 -> 19,940 img/s; B level;
    Winograd's transforms were 3-6x slower then: since 2026-12-03 it wins again from
    WIDE_WINO_MIN_TILES), and planar in training (28x28x1 -> 32 3x3 at batch 64, forward +
    weight gradient: 1.39 ms against 1.85); Winograd still wins in training (forward + backward
    at batch 64: 7x7x96 -> 96 gemm 8.11 ms, F(2x2) 6.16, F(4x4) 5.27; 14x14x24 -> 64: 7.29,
    6.09, 8.49), so training keeps its thresholds. Evaluation keeps "planar" for one-channel
    convs of 3x3 and wider (WIDE_PLANAR_MAX_C).
    An AVX-512 CPU whose OpenBLAS runs AVX2 kernels (OPENBLAS_CORETYPE=Haswell in a Zen 5's
    environment, 2026-12-07) is not wide: its products run at half that speed, and the
    narrow rules won there (compare_onnxruntime.py, 2 threads, batch 256, interleaved: net A
    26,773 -> 35,710 img/s, B 46,850 -> 58,548; training level: A 0.96x, B 1.02x).
    The thresholds were measured on this workplace's earlier machines (not recorded whether
    they had AVX-512) and decide everything where this is False.
    FLOWDSL_WIDE=1 or 0 overrides it (the test suite sets 0, so every algorithm keeps being run)."""
    global WIDE
    if WIDE is None and os.environ.get("FLOWDSL_WIDE") in ("0", "1"):
        WIDE = os.environ["FLOWDSL_WIDE"] == "1"
    if WIDE is None:
        from ..blas import own_products, wide_kernels
        WIDE = wide_kernels() and not own_products()
    return WIDE


OWN_RULES = None          # whether evaluation follows the own product's rules (see own_rules)
OWN_WINO_MIN_TILES = 256  # there, Winograd in evaluation from this many 2x2 output tiles a call


def own_rules():
    """Whether evaluation picks algorithms by the rules measured with flowdsl's own product
    (blas.own_products, AVX-512 CPUs; not where FLOWDSL_WIDE=0 or 1 names a rule set): Winograd
    from OWN_WINO_MIN_TILES tiles a call (F(2x2, 5x5) from WIDE_WINO25_MIN_C input channels too),
    else gemm, with the maxpool after it and relu in the same call (_vconv). Winograd recomputes
    its filter transform every call, and a call of a few images pays it whole (2 threads,
    interleaved, 2026-12-07 evening: net A at batch 4 428 us against gemm's 266, B at batch 8
    436 against 273; A at 16, shares of 8 images, 288 tiles each: 546 against 615; B at 256, its
    20-channel 5x5 conv as gemm: 4.59 ms against 5.78)."""
    global OWN_RULES
    if OWN_RULES is None:
        from ..blas import own_products
        OWN_RULES = os.environ.get("FLOWDSL_WIDE") not in ("0", "1") and own_products()
    return OWN_RULES


def _fix_pad(field, pad):
    return (field - 1) // 2 if pad == "same" else pad


@register("conv", aliases=("convolution", "conv2d"))
class Conv(Layer):
    params = (
        P("shape", "shape", None),
        P("filters", "int", 1, lo=1),
        P("field", "int", 3, lo=1),
        P("stride", "int", 1, lo=1),
        P("pad", "pad", 0),
        P("act", "call", "linear", table=activation_table),
        P("pad_mode", "name", None, choices=_padmodes.MODES, positional=False),
        BIAS,
        TRAINABLE,
    )
    has_weights = True
    spatial_filters = True

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if self.args["pad"] == "same" and self.args["field"] % 2 == 0:
            raise LayerError(f"pad=same needs an odd field, so the padding is equal on both sides. "
                             f"Received: field={self.args['field']}", "pad")

    @property
    def padding(self):
        return _fix_pad(self.args["field"], self.args["pad"])

    @property
    def pad_mode(self):
        """The padding mode when it is not zeros (None: zeros, done inside each algorithm)."""
        m = self.args.get("pad_mode")
        return None if m in (None, "zeros", "constant") or not self.padding else m

    def _run_as(self):
        """The conv the algorithms run: this one, or for another pad_mode a pad=0 twin over the
        input padded by _padmodes (so every algorithm supports every mode)."""
        if self.pad_mode is None:
            return self
        twin = getattr(self, "_twin", None)
        if twin is None or twin.in_shape[0] != self.in_shape[0]:
            twin = Conv(dict(self.args, pad=0, pad_mode=None), self.name, self.pos, self.where)
            c, h, w = self.in_shape
            p = self.padding
            twin.in_shape = (c, h + 2 * p, w + 2 * p)
            twin.out = twin.out_shape(twin.in_shape)
            self._twin = twin
        return twin

    def out_shape(self, s):
        need_map(self, s)
        c, h, w = s
        f, st, p = self.args["field"], self.args["stride"], self.padding
        if f > w + 2 * p or f > h + 2 * p:
            raise LayerError(f"field {f} does not fit the {show_shape(s)} input (pad {p}). "
                             f"Received: field={f}", "field")
        outs, self.ignored = [], []
        for size in (h, w):
            # rounded down, as in PyTorch, Keras and NeuroFlow: a stride that does not tile the
            # padded input leaves its last rows/columns unread (check notes how many)
            o = (size + 2 * p - f) // st + 1
            outs.append(o)
            self.ignored.append(size + 2 * p - ((o - 1) * st + f))
        return (self.args["filters"], outs[0], outs[1])

    def notes(self):
        rows, cols = getattr(self, "ignored", (0, 0))
        if not rows and not cols:
            return []
        what = " and ".join(f"{n} {word}{'s' if n > 1 else ''}" for n, word in
                            ((rows, "row"), (cols, "column")) if n)
        return [f"{self.name}: stride {self.args['stride']} does not tile the padded "
                f"{show_shape(self.in_shape)} input: its last {what} are never read"]

    def param_shapes(self, s):
        f, k = self.args["field"], self.args["filters"]
        return {"w": (f, f, s[0], k), "b": (k,)} if self.args.get("bias") is not False else {"w": (f, f, s[0], k)}

    def fans(self):
        f, k, c = self.args["field"], self.args["filters"], self.in_shape[0]
        return (f * f * c, f * f * k)

    @property
    def algo(self):
        if self.pad_mode is not None:
            return self._run_as().algo
        a = self.args
        if a["filters"] <= DIRECT_MAX_FILTERS:
            return "rows"
        if a["field"] == 3 and a["stride"] == 1 and self.in_shape[0] >= WINO_MIN_C:
            return "winograd4" if self.in_shape[0] >= WINO4_MIN_C else "winograd"
        if a["field"] == 5 and a["stride"] == 1 and self.in_shape[0] >= WINO25_MIN_C:
            return "winograd25"
        if self._planar_fits(PLANAR_MAX_C) and not wide_vectors():
            return "planar"
        return "gemm"

    def _planar_fits(self, max_c):
        a = self.args
        return a["stride"] == 1 and self.in_shape[0] <= max_c and self.padding <= a["field"] - 1

    def algo_for(self, n, training=True):
        """The algorithm a batch of n images runs: Winograd waits for WINO_MIN_TILES tiles; in
        evaluation where BLAS runs AVX-512 kernels for WIDE_WINO_MIN_TILES (F(2x2, 5x5) for
        WIDE_WINO25_MIN_C input channels too), and otherwise runs gemm (see
        wide_vectors), or planar for one-channel convs of 3x3 and wider fields
        (WIDE_PLANAR_MAX_C); with flowdsl's own product for OWN_WINO_MIN_TILES (own_rules).
        Monotonic in n: flowdsl.plan asks can_pool for the whole batch, forward for what it is
        given (a thread's share of a split pass), which so never picks
        a pooling algorithm its plan did not."""
        if self.pad_mode is not None:
            return self._run_as().algo_for(n, training)
        algo = self.algo
        th, tw = _winograd.tiles(self.out[1], self.out[2])
        wino = STRATEGIES[algo] in WINOGRADS
        if not training and algo != "rows" and wide_vectors():
            if wino and n * th * tw >= WIDE_WINO_MIN_TILES and (
                    algo != "winograd25" or self.in_shape[0] >= WIDE_WINO25_MIN_C):
                return algo
            wide_planar = self._planar_fits(WIDE_PLANAR_MAX_C) and self.args["field"] >= WIDE_PLANAR_MIN_FIELD
            return "planar" if wide_planar else "gemm"
        if not training and wino and own_rules():
            big = n * th * tw >= OWN_WINO_MIN_TILES and (algo != "winograd25" or self.in_shape[0] >= WIDE_WINO25_MIN_C)
            return algo if big else "gemm"
        return "gemm" if wino and n * th * tw < WINO_MIN_TILES else algo

    # --- capabilities (flowdsl.plan) ----------------------------------------------------------
    def own_act(self):
        return act_spec(self)

    def can_pool(self, n, training, window):
        return _pools(STRATEGIES[self.algo_for(n, training)], training)

    def bytes_per_sample(self):
        kept, dz, _ = super().bytes_per_sample()
        run = self._run_as()
        more, dx = STRATEGIES[run.algo].bytes_per_sample(run)
        if run is not self:   # the padded copy of the input, and its gradient
            padded = 4 * run.in_shape[0] * run.in_shape[1] * run.in_shape[2]
            more, dx = more + padded, dx + padded
        return kept + more, dz, dx

    # --- engine -----------------------------------------------------------------------------
    def forward(self, x, p, ctx, training):
        return self.forward_fused(x, p, ctx, training, act_spec(self), None)

    def forward_fused(self, x, p, ctx, training, act, pool):
        p, _ = biased(self, p)
        w, b = p["w"], p["b"]
        run = self._run_as()
        if run is not self:
            x = _padmodes.pad(x, self.padding, self.pad_mode)
        algo = ctx["algo"] = run.algo_for(x.shape[0], training)
        strategy = STRATEGIES[algo]
        kw = {"relu": True} if act[0] == "relu" and (getattr(strategy, "RELU", False) or (
            not training and getattr(strategy, "EVAL_RELU", False))) else {}
        if pool is not None and not _pools(strategy, training):
            raise RuntimeError(f"{self.name}: {algo} cannot apply the max window its plan gave it")
        if training or pool is not None:
            z = strategy.forward(run, x, w, b, training, ctx, pool, **kw)
        else:  # in chunks whose work buffers stay in cache
            step = strategy.eval_chunk(run, x.shape[0], CHUNK_FLOATS)
            z = _in_chunks(x, step, lambda xi: strategy.forward(run, xi, w, b, False, ctx, **kw))
        # relu applied by the strategy: z is y (relu's derivative reads z > 0, the same as y > 0);
        # else a fresh output (see activations.act_forward)
        y = z if kw else act_forward(act[0], act[1], z)
        if training:
            ctx["x"], ctx["z"], ctx["y"], ctx["act"] = x, z, y, act
            ctx["fused_relu"] = bool(kw)
        return y

    def to_onnx(self, g, x, p, state, extras):
        f, s, pad = self.args["field"], self.args["stride"], self.padding
        if self.pad_mode is not None:   # flowdsl's own index tables: every mode, exactly
            _, h, w = self.in_shape
            rows, cols = _padmodes.indices(h, w, pad, self.pad_mode)
            x = g.op("Gather", [x, g.const(f"{self.name}/rows", rows, np.int64)], f"{self.name}/pad_h", axis=2)
            x = g.op("Gather", [x, g.const(f"{self.name}/cols", cols, np.int64)], f"{self.name}/pad_w", axis=3)
            pad = 0
        ins = [x, g.const(f"{self.name}.w", p["w"].transpose(3, 2, 0, 1))]
        if "b" in p:
            ins.append(g.const(f"{self.name}.b", p["b"]))
        act = act_spec(self)
        linear = act[0] == "linear"
        z = g.op("Conv", ins, self.name if linear else f"{self.name}/z", kind="map", kernel_shape=[f, f],
                 strides=[s, s], pads=[pad] * 4)
        return z if linear else g.act(act, z, self.name)

    def backward(self, dy, p, g, ctx, need_dx):
        kind, alpha = ctx["act"]
        if ctx.get("fused_relu"):   # the strategy masks dy itself (see _rows.RELU)
            dz, ctx["mask"] = dy, ctx["y"]
        else:
            dz = act_backward(kind, alpha, ctx["z"], ctx["y"], dy)
        p, g = biased(self, p, g)
        run = self._run_as()
        dx = STRATEGIES[ctx["algo"]].backward(run, dz, p["w"], g, ctx, need_dx)
        if run is not self and dx is not None:
            _, h, w = self.in_shape
            dx = _padmodes.fold(dx, h, w, self.padding, self.pad_mode)
        return dx


def _pools(strategy, training):
    """Whether the strategy's forward applies a following max window itself (POOLS in
    evaluation, TRAIN_POOLS in training)."""
    return getattr(strategy, "TRAIN_POOLS", False) if training else strategy.POOLS


def _in_chunks(x, step, run):
    """run(xi) -> the (n_i, OH, OW, K) output of each chunk of `step` images of x, gathered; a
    single chunk's output is returned as it is (no copy)."""
    n = x.shape[0]
    if step >= n:
        return run(x)
    z = None
    for i in range(0, n, step):
        zi = run(x[i:i + step])
        if z is None:
            z = np.empty((n,) + zi.shape[1:], np.float32)
        z[i:i + step] = zi
    return z
