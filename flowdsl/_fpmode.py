"""Flush-to-zero and denormals-are-zero for flowdsl's threads (x86's MXCSR; see jit.flushed).

Imported only by flowdsl.jit, after numba is configured. Training on a sample the net already
classifies with certainty drives the gradients below float32's smallest normal value (1.2e-38),
and every product touching such denormal values takes a microcode assist: measured on net A at
batch 1, the weight-gradient products went from 0.09 to 9.5 ms and a training step from 0.7 to
25 ms. With FTZ and DAZ set those values count as zero, as on GPUs and in PyTorch with
torch.set_flush_denormal(True)."""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

BITS = 0x8040   # MXCSR bit 15 (flush to zero) and bit 6 (denormals are zero)


@intrinsic
def _mxcsr(typingctx, new):
    """The calling thread's MXCSR before the call; writes `new` unless it is negative."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p])
        st = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr")
        ld = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr")
        slot = cgutils.alloca_once(builder, i32)
        p = builder.bitcast(slot, i8p)
        builder.call(st, [p])
        old = builder.load(slot)
        with builder.if_then(builder.icmp_signed(">=", args[0], ir.Constant(ir.IntType(64), 0))):
            builder.store(builder.trunc(args[0], i32), slot)
            builder.call(ld, [p])
        return builder.zext(old, ir.IntType(64))

    return sig, codegen


@njit(cache=True, nogil=True)
def flush():
    """Set FTZ and DAZ on the calling thread; returns its MXCSR before (for restore)."""
    old = _mxcsr(-1)
    _mxcsr(old | BITS)
    return old


@njit(cache=True, nogil=True)
def restore(old):
    _mxcsr(old)


@njit(cache=True, nogil=True)
def read():
    return _mxcsr(-1)


@njit(parallel=True, cache=True)
def flush_workers(n):
    """Set FTZ and DAZ on numba's worker threads (and the caller's, which the caller restores):
    a parallel loop of many iterations reaches every worker."""
    out = np.zeros(n * 64, np.int64)
    for i in prange(n * 64):
        out[i] = _mxcsr(_mxcsr(-1) | BITS)
    return out.sum()
