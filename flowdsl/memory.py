"""How much memory there is, and whether a model (and its data) fits in it.

Available memory: Linux's MemAvailable, or less where a cgroup (a container) limits the process;
FLOWDSL_MEM_AVAILABLE (bytes) overrides it. The checks raise a FlowError whose advice the caller
words (`--batch ` on the command line, `batch=` in the API): this module knows nothing of verbs."""
from __future__ import annotations

import math
import os

from .errors import FlowError, size_text


def available_memory():
    """Bytes of memory a new allocation can get, or None if unknown."""
    env = os.environ.get("FLOWDSL_MEM_AVAILABLE", "").strip()
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise FlowError(f"FLOWDSL_MEM_AVAILABLE must be a number of bytes. Received: {env}") from None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        return None
    room = _cgroup_room()
    if room is not None and (avail is None or room < avail):
        avail = room
    return avail


def _cgroup_room():
    """Limit minus usage (less reclaimable file cache) of this process's memory cgroup, v2 or v1;
    None when there is no limit or it cannot be read."""
    for limit_f, usage_f, stat_f, cache_key in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")):
        try:
            with open(limit_f) as f:
                text = f.read().strip()
            if text == "max" or int(text) >= 2**60:  # no limit
                return None
            limit = int(text)
            with open(usage_f) as f:
                usage = int(f.read().strip())
            cache = 0
            with open(stat_f) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == cache_key:
                        cache = int(v)
            return max(0, limit - usage + cache)
        except (OSError, ValueError):
            continue
    return None


# ------------------------------------------------------------------------------------ estimates
def train_bytes_per_sample(model):
    """Bytes per sample alive at the peak of a training step: the batch (and its augmented
    copy), every layer's output and what it keeps for backward (Layer.bytes_per_sample: a
    pre-activation, a mask, an argmax, conv's im2col rows or padded input), plus the largest
    backward transient (a layer's incoming and outgoing gradients and its own buffers)."""
    kept = 2 * 4 * math.prod(model.input_shape)
    peak = 0
    first = True
    for l in model.layers:
        if l.role == "input":
            continue
        extra, dz, dx = l.bytes_per_sample()
        out = 4 * math.prod(l.out)
        kept += out + extra
        # the first layer computes no input gradient
        peak = max(peak, out + dz + (0 if first else 4 * math.prod(l.in_shape) + dx))
        first = False
    return kept + peak


def train_estimate(model, batch, data_bytes=0):
    """Rough bytes needed to train at this batch size: parameters, gradients and the optimizer's
    two moments and decay mask (5 float32 copies), plus per sample what the forward pass keeps
    for the backward pass and the largest backward transient, plus the data held in memory.
    Measured peaks are within about 25% of it either way."""
    return 4 * 5 * model.n_params() + batch * train_bytes_per_sample(model) + data_bytes


def data_budget(model, batch):
    """Bytes of RAM data may take while training at this batch (None: unknown, no limit): what
    is available less the training estimate, with a tenth kept free. Sources that can stream
    (image folders, IDX) stream beyond it."""
    avail = available_memory()
    if not avail:
        return None
    return max(0, int(avail * 0.9) - train_estimate(model, batch))


def check_training(model, batch, option, data_bytes=0):
    """Refuse, before allocating anything, a batch whose estimated training memory exceeds the
    memory available, suggesting a batch that fits (`option` is how the caller's user writes
    the batch: '--batch ' or 'batch=') or saying that none does."""
    need = train_estimate(model, batch, data_bytes)
    avail = available_memory()
    if not avail or need <= avail:
        return
    fixed = train_estimate(model, 0, data_bytes)   # parameters, gradients, optimizer state, data
    per = max(1, (need - fixed) // max(1, batch))  # per sample
    fit_batch = int((avail * 0.8 - fixed) // per)
    if fit_batch >= 1:
        raise FlowError(f"training at batch {batch} needs about {size_text(need)} (estimated) but only {size_text(avail)} "
                        f"of memory is available; try {option}{fit_batch}", model.file)
    data = f"; {size_text(data_bytes)} of data in memory" if data_bytes else ""
    raise FlowError(f"this model needs about {size_text(fixed + per)} to train even at batch 1 ({model.n_params():,} "
                    f"weights: {size_text(fixed - data_bytes)} with their gradients and optimizer state; "
                    f"{size_text(per)} per sample{data}), but only {size_text(avail)} of memory is available; "
                    f"make the input or the layers smaller", model.file)


def check_parameters(model, spec, n):
    """Refuse, before allocating, parameters that cannot fit in memory: a dense layer after a
    large map can hold billions of weights. Needs the parameter and gradient buffers (float32)
    and, while initialising, the largest parameter in float64. spec: (layer, name, shape, offset)."""
    from .layers.base import show_shape
    largest = max(spec, key=lambda t: math.prod(t[2]), default=None)
    need = 8 * n + (8 * math.prod(largest[2]) if largest else 0)
    avail = available_memory()
    if avail and need > avail:
        l, pname = largest[0], largest[1]
        raise FlowError(f"the model has {n:,} weights: its parameters and gradients need {size_text(8 * n)} "
                        f"({size_text(need)} while initialising), but only {size_text(avail)} of memory is available. "
                        f"The largest is {l.name}.{pname} with {math.prod(largest[2]):,} weights "
                        f"({l.describe()} after {show_shape(l.in_shape)}); make it smaller", model.file)
