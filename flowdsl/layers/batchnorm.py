"""batchnorm(momentum=0.9, eps=1e-5, trainable=true): normalise each channel (or feature) with the batch
statistics in training and running averages in evaluation, then scale and shift (2 learned
parameters per channel). Shape unchanged.

Channels are the last axis (maps are NHWC), so both maps and vectors are an (M, C) matrix with
statistics per column. Training normalises with the biased batch variance and updates the
running averages r = momentum*r + (1-momentum)*batch with the unbiased one (as PyTorch).

Kernels: the column sums are reductions over rows, so each parallel chunk of rows sums into its
own row of partials, merged serially (no races); partials are float64 because a chunk may hold
many thousand rows. Backward recomputes x-hat from x instead of keeping a second copy.
Followed by a maxpool of windows that do not overlap, batchnorm runs it too (flowdsl.plan's
pooled steps, forward_fused): the normalised values go straight into the window maxima."""
import numpy as np

from ..jit import kernel, prange
from ..layers import register
from .base import TRAINABLE, Layer, P

CHUNKS = 64   # parallel row chunks for the column reductions


@register("batchnorm", aliases=("bn",))
class BatchNorm(Layer):
    params = (P("momentum", "float", 0.9, lo=0.0, hi=1.0, hi_open=True),
              P("eps", "float", 1e-5, lo=0.0, lo_open=True), TRAINABLE)
    has_weights = True

    def param_shapes(self, s):
        c = s[0]
        return {"gamma": (c,), "beta": (c,)}

    def new_state(self):
        c = self.in_shape[0]
        return {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}

    def to_onnx(self, g, x, p, state, extras):
        ins = [x] + [g.const(f"{self.name}.{k}", v) for k, v in
                     (("gamma", p["gamma"]), ("beta", p["beta"]), ("mean", state["mean"]), ("var", state["var"]))]
        return g.op("BatchNormalization", ins, self.name, kind=g.kind[x], epsilon=float(self.args["eps"]))

    def can_pool(self, n, training, window):
        return window[1] >= window[0]   # windows that do not overlap (the backward's scatter)

    def forward(self, x, p, ctx, training):
        return self.forward_fused(x, p, ctx, training, None, None)

    def forward_fused(self, x, p, ctx, training, act, pool):
        """forward, or with pool = (size, stride, PH, PW) the maxpool after it applied to the
        normalised values as they are computed: the full-size output is never written, and in
        training the winners are recorded (their flat index y*W + x, as maxpool, and their
        input value, which is all backward's sums need)."""
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        m = x2.shape[0]
        st = ctx["state"]
        eps = self.args["eps"]
        world = ctx.get("world")
        record = training       # a training pass (backward follows): pooling records the winners
        if ctx.get("frozen"):   # gradients in evaluation mode (focus --gradcam): running statistics
            training = False
        if training and world is not None:   # data-parallel ranks: the global batch's statistics
            mean, var, m = _global_stats(world, x2)
            ctx["count"] = m
        if training and world is None:
            mean = np.empty(c, np.float64)
            var = np.empty(c, np.float64)
            _bn_stats(x2, mean, var, min(CHUNKS, m))
        if training:
            mom = self.args["momentum"]
            unbiased = var * (m / (m - 1)) if m > 1 else var
            st["mean"][...] = mom * st["mean"] + (1.0 - mom) * mean
            st["var"][...] = mom * st["var"] + (1.0 - mom) * unbiased
        else:
            mean = st["mean"].astype(np.float64)
            var = st["var"].astype(np.float64)
        inv = 1.0 / np.sqrt(var + eps)
        scale = (p["gamma"] * inv).astype(np.float32)
        shift = (p["beta"] - mean * scale).astype(np.float32)
        ctx["x"], ctx["training"] = x, training
        ctx["mean"], ctx["inv"] = mean.astype(np.float32), inv.astype(np.float32)
        if pool is None:
            y = np.empty_like(x)
            _bn_affine(x2, scale, shift, y.reshape(-1, c))
            return y
        size, stride, ph, pw = pool
        y = np.empty((x.shape[0], ph, pw, c), np.float32)
        if record:
            arg = np.empty(y.shape, np.int32)
            won = np.empty(y.shape, np.float32)
            _bn_pool(x, scale, shift, y, arg, won, size, stride)
            ctx["pool"], ctx["arg"], ctx["won"] = (size, stride), arg, won
        else:
            _bn_pool_eval(x, scale, shift, y, size, stride)
        return y

    def backward(self, dy, p, g, ctx, need_dx):
        """dy is the gradient at the pooled output when forward applied the maxpool (ctx "pool"):
        the sums run over the pooled values (the full-size gradient is zero off the winners)
        and dx takes dy at the winners."""
        x = ctx["x"]
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        m = x2.shape[0]
        mean, inv = ctx["mean"], ctx["inv"]
        pool = ctx.get("pool")
        dys = dy.reshape(-1, c)
        xs = ctx["won"].reshape(-1, c) if pool else x2   # pooled: the winners' inputs
        sdy = np.empty(c, np.float64)
        sdyx = np.empty(c, np.float64)
        _bn_bwd_sums(xs, dys, mean, inv, sdy, sdyx, min(CHUNKS, xs.shape[0]))
        g["beta"][...] = sdy
        g["gamma"][...] = sdyx
        if not need_dx:
            return None
        dx = np.empty_like(x)
        scale = (p["gamma"] * inv).astype(np.float32)
        if ctx["training"]:
            # dx = gamma*inv * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the batch
            # (over the global batch on data-parallel ranks: the sums are reduced first)
            if ctx.get("world") is not None:
                both = ctx["world"].allreduce(np.concatenate([sdy, sdyx]))
                sdy, sdyx, m = both[:c], both[c:], ctx["count"]
            mdy, mdyx = (sdy / m).astype(np.float32), (sdyx / m).astype(np.float32)
        else:  # running statistics are constants: dx = dy * scale (the kernels with zero means)
            mdy = mdyx = np.zeros(c, np.float32)
        if pool is None:
            _bn_dx(x2, dys, mean, inv, scale, mdy, mdyx, dx.reshape(-1, c))
        else:
            _bn_pool_dx(x, dy, ctx["arg"], mean, inv, scale, mdy, mdyx, dx, pool[0], pool[1])
        return dx


def _global_stats(world, x2):
    """(mean, biased variance, count) per column over every rank's rows, two passes as
    _bn_stats (float64 sums: the exact mean first, then the squared deviations from it)."""
    m, c = x2.shape
    s = np.zeros(c + 1, np.float64)
    chunks = max(1, min(CHUNKS, m))
    _bn_col_sums(x2, np.zeros(c, np.float64), s[:c], False, chunks)
    s[c] = m
    world.allreduce(s)
    m = int(s[c])
    mean = s[:c] / m
    q = np.empty(c, np.float64)
    _bn_col_sums(x2, mean, q, True, chunks)
    var = world.allreduce(q) / m
    return mean, var, m


# ------------------------------------------------------------------------------------ kernels
@kernel
def _bn_stats(x, mean, var, chunks):
    """Column mean and biased variance of x (M, C), two passes, float64 partials per chunk."""
    m, c = x.shape
    part = np.zeros((chunks, c), np.float64)
    for t in prange(chunks):
        for r in range(m * t // chunks, m * (t + 1) // chunks):
            for k in range(c):
                part[t, k] += x[r, k]
    for k in range(c):
        acc = 0.0
        for t in range(chunks):
            acc += part[t, k]
        mean[k] = acc / m
    part[:, :] = 0.0
    for t in prange(chunks):
        for r in range(m * t // chunks, m * (t + 1) // chunks):
            for k in range(c):
                d = x[r, k] - mean[k]
                part[t, k] += d * d
    for k in range(c):
        acc = 0.0
        for t in range(chunks):
            acc += part[t, k]
        var[k] = acc / m


@kernel
def _bn_col_sums(x, center, out, square, chunks):
    """out[k] = the sum over rows of x[r, k] - center[k], or of its square (float64)."""
    m, c = x.shape
    part = np.zeros((chunks, c), np.float64)
    for t in prange(chunks):
        for r in range(m * t // chunks, m * (t + 1) // chunks):
            for k in range(c):
                d = x[r, k] - center[k]
                part[t, k] += d * d if square else d
    for k in range(c):
        acc = 0.0
        for t in range(chunks):
            acc += part[t, k]
        out[k] = acc


@kernel
def _bn_affine(x, scale, shift, y):
    """y = x * scale + shift, per column."""
    m, c = x.shape
    for r in prange(m):
        for k in range(c):
            y[r, k] = x[r, k] * scale[k] + shift[k]


@kernel
def _bn_bwd_sums(x, dy, mean, inv, sdy, sdyx, chunks):
    """Column sums of dy and of dy * xhat, xhat = (x - mean) * inv."""
    m, c = x.shape
    p1 = np.zeros((chunks, c), np.float64)
    p2 = np.zeros((chunks, c), np.float64)
    for t in prange(chunks):
        for r in range(m * t // chunks, m * (t + 1) // chunks):
            for k in range(c):
                d = dy[r, k]
                p1[t, k] += d
                p2[t, k] += d * ((x[r, k] - mean[k]) * inv[k])
    for k in range(c):
        a = 0.0
        b = 0.0
        for t in range(chunks):
            a += p1[t, k]
            b += p2[t, k]
        sdy[k] = a
        sdyx[k] = b


@kernel
def _bn_dx(x, dy, mean, inv, scale, mdy, mdyx, dx):
    m, c = x.shape
    for r in prange(m):
        for k in range(c):
            xh = (x[r, k] - mean[k]) * inv[k]
            dx[r, k] = scale[k] * (dy[r, k] - mdy[k] - xh * mdyx[k])


@kernel
def _bn_pool(x, scale, shift, y, arg, won, k, s):
    """y[n,i,j,c] = max of x * scale + shift over the window x[n, i*s : i*s+k, j*s : j*s+k, c]
    (clipped to the input); arg = y_in * W + x_in of the first maximum (as maxpool's _max_fwd),
    won = x there. Running maxima in C-long buffers updated with selects (they vectorise); 2x2
    windows inside the input in one pass over the channels (as maxpool's _max_fwd)."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    if k == 2 and s == 2 and 2 * oh <= h and 2 * ow <= w:
        for row in prange(n_ * oh):
            n = row // oh
            i = row % oh
            for j in range(ow):
                q = np.int32(2 * i * w + 2 * j)
                for cc in range(c):
                    a, sh = scale[cc], shift[cc]
                    r = x[n, 2 * i, 2 * j, cc]
                    bv = r * a + sh
                    bq = q
                    xv = x[n, 2 * i, 2 * j + 1, cc]
                    v = xv * a + sh
                    up = v > bv
                    bv, bq, r = (v, q + 1, xv) if up else (bv, bq, r)
                    xv = x[n, 2 * i + 1, 2 * j, cc]
                    v = xv * a + sh
                    up = v > bv
                    bv, bq, r = (v, q + w, xv) if up else (bv, bq, r)
                    xv = x[n, 2 * i + 1, 2 * j + 1, cc]
                    v = xv * a + sh
                    up = v > bv
                    bv, bq, r = (v, q + w + 1, xv) if up else (bv, bq, r)
                    y[n, i, j, cc] = bv
                    arg[n, i, j, cc] = bq
                    won[n, i, j, cc] = r
        return
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        y0 = i * s
        y1 = min(y0 + k, h)
        best = np.empty(c, np.float32)
        where = np.empty(c, np.int32)
        raw = np.empty(c, np.float32)
        for j in range(ow):
            x0 = j * s
            x1 = min(x0 + k, w)
            for cc in range(c):
                raw[cc] = x[n, y0, x0, cc]
                best[cc] = x[n, y0, x0, cc] * scale[cc] + shift[cc]
                where[cc] = y0 * w + x0
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    q = np.int32(yy * w + xx)
                    for cc in range(c):
                        xv = x[n, yy, xx, cc]
                        v = xv * scale[cc] + shift[cc]
                        up = v > best[cc]
                        best[cc] = v if up else best[cc]
                        where[cc] = q if up else where[cc]
                        raw[cc] = xv if up else raw[cc]
            for cc in range(c):
                y[n, i, j, cc] = best[cc]
                arg[n, i, j, cc] = where[cc]
                won[n, i, j, cc] = raw[cc]


@kernel
def _bn_pool_eval(x, scale, shift, y, k, s):
    """_bn_pool without the winners (evaluation)."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    if k == 2 and s == 2 and 2 * oh <= h and 2 * ow <= w:
        for row in prange(n_ * oh):
            n = row // oh
            i = row % oh
            for j in range(ow):
                for cc in range(c):
                    a, sh = scale[cc], shift[cc]
                    y[n, i, j, cc] = max(max(x[n, 2 * i, 2 * j, cc] * a + sh, x[n, 2 * i, 2 * j + 1, cc] * a + sh),
                                         max(x[n, 2 * i + 1, 2 * j, cc] * a + sh,
                                             x[n, 2 * i + 1, 2 * j + 1, cc] * a + sh))
        return
    for row in prange(n_ * oh):
        n = row // oh
        i = row % oh
        y0 = i * s
        y1 = min(y0 + k, h)
        best = np.empty(c, np.float32)
        for j in range(ow):
            x0 = j * s
            x1 = min(x0 + k, w)
            for cc in range(c):
                best[cc] = x[n, y0, x0, cc] * scale[cc] + shift[cc]
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    for cc in range(c):
                        v = x[n, yy, xx, cc] * scale[cc] + shift[cc]
                        best[cc] = v if v > best[cc] else best[cc]
            for cc in range(c):
                y[n, i, j, cc] = best[cc]


@kernel
def _bn_pool_dx(x, dp, arg, mean, inv, scale, mdy, mdyx, dx, k, s):
    """_bn_dx with dy = dp at each window's winner (arg) and zero elsewhere, s >= k: the task of
    output row i owns input rows [i*s, (i+1)*s) (the last one through the bottom), so it alone
    writes them; a position in a window compares its flat index with the window's winners
    (a select, which vectorises), one outside every window gets the dy = 0 term."""
    n_, h, w, c = x.shape
    _, oh, ow, _ = dp.shape
    zero = np.float32(0.0)
    for t in prange(n_ * oh):
        n = t // oh
        i = t % oh
        r0 = i * s
        r1 = h if i == oh - 1 else (i + 1) * s
        for yy in range(r0, r1):
            rin = yy - r0 < k
            for xx in range(w):
                j = xx // s
                q = np.int32(yy * w + xx)
                if rin and j < ow and xx - j * s < k:
                    for cc in range(c):
                        xh = (x[n, yy, xx, cc] - mean[cc]) * inv[cc]
                        d = dp[n, i, j, cc] if arg[n, i, j, cc] == q else zero
                        dx[n, yy, xx, cc] = scale[cc] * (d - mdy[cc] - xh * mdyx[cc])
                else:
                    for cc in range(c):
                        xh = (x[n, yy, xx, cc] - mean[cc]) * inv[cc]
                        dx[n, yy, xx, cc] = -scale[cc] * (mdy[cc] + xh * mdyx[cc])
