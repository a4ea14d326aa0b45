"""The training loop behind `flowdsl train` and Net.fit: batches, augmentation, schedule,
evaluation each epoch, checkpoints with exact resume, progress, early stopping, Ctrl-C.

Determinism: every random draw is keyed by (seed, purpose, step or epoch) rather than taken
from one running generator, so a run resumed at step k draws exactly what the uninterrupted
run drew from step k on."""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import jit as _jit
from .batches import prefetcher
from .data import Dataset, as_dataset
from .errors import FlowError

SAVE_SECONDS = 60.0  # last.npz is also written at least this often within an epoch

HISTORY_COLS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img_per_s")


@dataclass
class History:
    rows: list = field(default_factory=list)   # one dict per epoch (HISTORY_COLS)
    confusion: object = None                   # last test confusion matrix
    best_confusion: object = None              # the best epoch's (the weights in best.npz)
    best_epoch: int = 0                        # that epoch (1-based; 0: none yet)
    classes: list = field(default_factory=list)
    stopped: str = ""                          # why training ended early, if it did
    signal: int = 0                            # the signal (SIGINT, SIGTERM) that stopped it, if one did

    def __getitem__(self, key):
        return [r[key] for r in self.rows]

    def as_array(self):
        return np.array([[r[c] for c in HISTORY_COLS] for r in self.rows], np.float64).reshape(-1, len(HISTORY_COLS))


def evaluate(net, data, y=None, batch=256, tta=None, check=True, top=1, members=None):
    """Loss, accuracy and confusion matrix (rows: true class, columns: predicted) on a Dataset
    (or arrays x, y), a batch at a time.
    tta="hflip": classify by the mean probabilities of each image and its mirror image (the
    loss is then the cross-entropy of those mean probabilities). members: several Nets of the
    same model (an ensemble): classify by the mean of their probabilities (net is the first).
    top=K: also 'topk', the accuracies counting the best 1..K guesses as right. check=False skips
    the label and NaN checks (fit checked its test set once, not every epoch)."""
    ds = data if isinstance(data, Dataset) else as_dataset(data, y)
    if check:
        _check_data(net, ds, "the evaluation data")
    loss_layer = net.loss_layer
    n = len(ds)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "confusion": None, "topk": [float("nan")] * top}
    labels = getattr(loss_layer, "targets", "labels") == "labels"
    k = loss_layer.out[0]
    conf = np.zeros((k, k), np.int64) if labels else None
    hits = np.zeros(max(1, top), np.int64)   # hits[r]: samples whose true class ranks r-th
    tot = 0.0
    probs = []
    by_probs = tta is not None or (members is not None and len(members) > 1)
    # on data-parallel ranks each takes its share of the samples and the sums are reduced below
    # (the probability-averaging forms, tta and ensembles, run whole on every rank)
    world = getattr(net, "world", None)
    sharded = world is not None and world.size > 1 and not by_probs
    mine = world.shard(np.arange(n))[0] if sharded else np.arange(n)
    for i in range(0, len(mine), batch):
        idx = mine[i:i + batch]
        xb, yb = ds.batch(idx), ds.y[idx]
        if by_probs:
            z = sum(m.predict(xb, batch=batch, tta=tta) for m in (members or [net]))
            if members:
                z = z / np.float32(len(members))
            probs.append(z)
        else:
            z = net.forward(xb)
            l, _, _ = loss_layer.loss(z, yb)
            tot += l * len(z)
        if labels:
            np.add.at(conf, (yb, z.argmax(axis=1)), 1)
            if top > 1:
                # rank of the true class: how many classes score higher (ties count for it)
                rank = (z > z[np.arange(len(yb)), yb][:, None]).sum(axis=1)
                np.add.at(hits, rank[rank < top], 1)
    if sharded:
        sums = world.allreduce(np.concatenate([[tot], hits, conf.ravel() if labels else []]).astype(np.float64))
        tot, hits = float(sums[0]), sums[1:1 + len(hits)].round().astype(np.int64)
        if labels:
            conf = sums[1 + len(hits):].round().astype(np.int64).reshape(conf.shape)
    topk = list(np.cumsum(hits) / n) if top > 1 and labels else []
    if by_probs:
        p = np.concatenate(probs)
        if not labels:
            d = p.astype(np.float64) - np.asarray(ds.y, np.float64).reshape(p.shape)
            return {"loss": float((d * d).sum() / (2 * n)), "acc": float("nan"), "confusion": None, "topk": topk}
        return {"loss": loss_layer.prob_loss(p, ds.y), "acc": float(np.trace(conf) / n), "confusion": conf,
                "topk": topk}
    if not labels:
        return {"loss": tot / n, "acc": float("nan"), "confusion": None, "topk": topk}
    return {"loss": tot / n, "acc": float(np.trace(conf) / n), "confusion": conf, "topk": topk}


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop stops at the next step boundary and saves. A second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.flag = None
        self.signum = 0
        self.synced = False   # data-parallel ranks: every rank knows that one of them stops
        self.old = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.flag is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGTERM)"
        self.signum = signum

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def threading_main():
    import threading
    return threading.current_thread() is threading.main_thread()


def fit(net, x, y, test=None, *, epochs=None, iterations=None, batch=32, optimizer=None, schedule=None,
        l2=0.0, seed=0, augment=(), patience=None, out_dir=None, checkpoint_every=None, resume=None,
        classes=None, verbose=1, log=None, callback=None):
    """Train `net` on a Dataset x (y None) or arrays x (NHWC float32), y. test: a Dataset, (x, y)
    or None. Returns a History. Streamed batches are read from the cache in a prefetch thread.

    verbose: 0 silent, 1 a progress bar on a terminal and one line per epoch otherwise, 2 one
    line per epoch. out_dir: write last.npz, best.npz and log.csv there. callback(step, loss) is
    called after every step; returning True stops training as Ctrl-C does (saving last.npz)."""
    from .args import CallValue
    from .augment import Augmenter
    from .checkpoint import sweep_temp
    from .optim import Optimizer, lr_at
    from .settings import OPTIMIZERS

    from .dist import world as _world
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    w = net.world = _world()
    if not w.root:   # one writer: rank 0 prints, logs and saves; the others only compute
        verbose, out_dir = 0, None
    ds = x if isinstance(x, Dataset) else as_dataset(x, y)
    if test is not None and not isinstance(test, Dataset):
        test = as_dataset(*test)
    n = len(ds)
    if n == 0:
        raise FlowError("no training data")
    _check_data(net, ds, "the training data")
    if test is not None:
        _check_data(net, test, "the test data")
    if optimizer is None:
        optimizer = CallValue("adam", tuple((p.name, p.default) for p in OPTIMIZERS["adam"]))
    batch = max(1, min(int(batch), n))
    per_epoch = math.ceil(n / batch)
    if iterations is None:
        epochs = epochs or 1
        total = epochs * per_epoch
    else:
        total = int(iterations)
        epochs = math.ceil(total / per_epoch)
    opt = Optimizer(net, optimizer, l2)
    aug = Augmenter(augment, seed) if augment else None
    if aug is not None:
        aug.check(net.model.input_shape, net.model.file)
    hist = History(classes=list(classes or []))
    step, best, bad = 0, -math.inf, 0
    running = (0.0, 0.0, 0.0)
    if resume is not None:
        step, best, bad, running = _restore(net, opt, hist, resume, w)
        if verbose:
            log(f"resuming from epoch {min(step // per_epoch + 1, epochs)}, step {step} of {total} ({resume})")
    if out_dir:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise FlowError(f"cannot create the output folder {out_dir}: {e.strerror or e}") from None
        sweep_temp(out_dir)  # leftovers of runs killed while saving
        if resume is None:
            _save(net, opt, hist, os.path.join(out_dir, "last.npz"), 0, best, bad, seed)

    use_bar = verbose == 1 and sys.stderr.isatty()
    bar = None
    if use_bar:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, leave=True, file=sys.stderr)
    perms = {}

    def fetch(step):
        """The samples of a step (a seeded permutation of the samples per epoch), still compact:
        what the prefetch thread does for streamed data (reading, which waits on the disk)."""
        epoch, i = divmod(step, per_epoch)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.default_rng([seed, 2, epoch]).permutation(n)
        idx = perms[epoch][i * batch:(i + 1) * batch]
        mine, rows = w.shard(idx)   # on data-parallel ranks: this rank's share, read by it alone
        try:
            return (mine, rows, len(idx)), ds.fetch(mine)
        except OSError as e:
            raise FlowError(f"cannot read the training data ({ds.source}): {e}") from None

    def finish(step, part, fetched):
        """Scaled to float32 and augmented, on the training thread: CPU work that a prefetch
        thread would take from numba's workers when every core runs one (2-core machines)."""
        idx, rows, total = part
        xb = ds.scale(fetched)
        if aug is not None:
            xb = aug.apply(xb, np.random.default_rng([seed, 3, step]), rows=rows, total=total)
        return part, xb, ds.y[idx]

    def say(msg):
        if verbose and bar is not None:
            bar.write(msg, file=sys.stderr)
        elif verbose:
            log(msg)

    def compiling(_name):
        say(f"compiling kernels for {_kernel_summary(net, opt)} (first run only, about 10-60 s; cached in "
            f"{_jit.cache_dir()})")

    clock = _jit.KernelClock(on_compile=compiling)
    ep_loss, ep_correct, ep_seen = running  # a resumed run continues its epoch's sums
    ar_secs, ar_steps = 0.0, 0
    last_save = time.monotonic()
    t_epoch = time.perf_counter()
    last_eval = None
    with _Stop() as stop, clock:
        net.fork_helpers(batch)   # before the prefetch thread starts (none on MPI ranks)
        # streamed data: the next batches are read (and augmented) in a thread while a step runs
        prefetch = prefetcher(ds.streamed)(fetch, step, total)
        try:
            while step < total:
                # several ranks stop together, at the step boundary after the one whose reduction
                # carried somebody's stop flag (a rank that stopped alone would hang the others)
                if stop.flag if w.size == 1 else stop.synced:
                    hist.stopped, hist.signal = stop.flag, stop.signum
                    break
                epoch, i = divmod(step, per_epoch)
                part, xb, yb = finish(step, *prefetch.get(step))
                idx, rows, gbatch = part
                net.rng = np.random.default_rng([seed, 4, step])
                net.batch_rows = (rows, gbatch)
                lr = lr_at(schedule, opt.lr, step, total, per_epoch)
                with np.errstate(all="ignore"):  # divergence is reported below, once, clearly
                    loss, correct = net.loss_grad(xb, yb, total=gbatch)
                if w.size > 1:
                    # one Allreduce of the flat gradients (each rank's share of the global mean),
                    # and one of the step's loss, correct count and stop flag
                    t_ar = time.perf_counter()
                    w.allreduce(net.gflat)
                    sums = w.allreduce(np.array([loss * len(idx), correct, 1.0 if stop.flag else 0.0]))
                    ar_secs += time.perf_counter() - t_ar
                    ar_steps += 1
                    loss, correct = float(sums[0]) / gbatch, int(round(sums[1]))
                    if sums[2]:
                        stop.synced = True
                        if not stop.flag:   # another rank was told to stop: all stop here
                            stop.flag, stop.signum = "terminated (SIGTERM)", signal.SIGTERM
                if not math.isfinite(loss):
                    kept = " and the last good checkpoint is kept" if out_dir else ""
                    lower = f"--lr {lr / 10:.3g}" if out_dir else f"lr={lr / 10:.3g}"
                    raise FlowError(f"the loss became {loss} at step {step + 1} (epoch {epoch + 1}, learning rate "
                                    f"{lr:.3g}); training stopped{kept}. Try a lower learning rate ({lower}).")
                opt.step(lr)
                step += 1
                names, ksecs = clock.take_compiled()
                if names:
                    say(f"compiled {len(names)} kernels in {ksecs:.1f} s; later runs load them from the cache")
                if callback is not None and callback(step, loss):
                    stop.flag = "stopped by callback"
                ep_loss += loss * gbatch
                ep_correct += correct
                ep_seen += gbatch
                if bar is not None:
                    el = time.perf_counter() - t_epoch
                    bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} loss {ep_loss / ep_seen:.4f} "
                                        f"acc {ep_correct / ep_seen:.3f} {ep_seen / max(el, 1e-9):,.0f} img/s",
                                        refresh=False)
                    bar.update(1)
                end_of_epoch = step % per_epoch == 0 or step == total
                if end_of_epoch:
                    secs = time.perf_counter() - t_epoch
                    ksecs = clock.take()  # compiling and loading kernels is not training: not in img/s
                    row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": ep_loss / ep_seen,
                           "train_acc": ep_correct / ep_seen, "test_loss": float("nan"),
                           "test_acc": float("nan"), "seconds": secs,
                           "img_per_s": ep_seen / max(secs - ksecs, 1e-9)}
                    if test is not None and len(test):
                        last_eval = evaluate(net, test, check=False)
                        row["test_loss"], row["test_acc"] = last_eval["loss"], last_eval["acc"]
                        hist.confusion = last_eval["confusion"]
                    clock.take()
                    hist.rows.append(row)
                    metric = _metric(row)[1]
                    improved = metric > best
                    if improved:
                        best, bad = metric, 0
                        hist.best_confusion, hist.best_epoch = hist.confusion, epoch + 1
                    else:
                        bad += 1
                    if out_dir:
                        _save(net, opt, hist, os.path.join(out_dir, "last.npz"), step, best, bad, seed)
                        last_save = time.monotonic()
                        if improved:
                            _save(net, opt, hist, os.path.join(out_dir, "best.npz"), step, best, bad, seed)
                        write_log(hist, os.path.join(out_dir, "log.csv"))
                    line = _epoch_line(row, epochs)
                    if ksecs >= 0.5:
                        line += f" ({ksecs:.1f} s of it loading kernels)"
                    if ar_steps:   # data-parallel ranks: what the gradient exchange cost
                        line += f"  allreduce {1e3 * ar_secs / ar_steps:.2f} ms/step ({w.size} ranks)"
                        ar_secs, ar_steps = 0.0, 0
                    say(line)
                    ep_loss = ep_correct = ep_seen = 0.0
                    t_epoch = time.perf_counter()
                    if patience and bad >= patience:
                        name, at = _best_of(hist.rows)
                        hist.stopped = (f"stopped early at epoch {epoch + 1}: {name} did not improve for {patience} "
                                        f"epochs (best {best if name == 'test_acc' else -best:.4f} at epoch {at})")
                        say(hist.stopped)
                        break
                elif out_dir and ((checkpoint_every and step % checkpoint_every == 0)
                                  or time.monotonic() - last_save > SAVE_SECONDS):
                    _save(net, opt, hist, os.path.join(out_dir, "last.npz"), step, best, bad, seed,
                          (ep_loss, ep_correct, ep_seen))
                    last_save = time.monotonic()
        finally:
            prefetch.close()
            net.release()   # split training's helper processes and the memory they hold
            if bar is not None:
                bar.close()
        if hist.stopped and out_dir and not hist.stopped.startswith("stopped early"):
            _save(net, opt, hist, os.path.join(out_dir, "last.npz"), step, best, bad, seed,
                  (ep_loss, ep_correct, ep_seen))
            if verbose:
                log(f"{hist.stopped}: saved {os.path.join(out_dir, 'last.npz')} at step {step}; "
                    f"continue with --resume {os.path.join(out_dir, 'last.npz')}")
    hist.step = step
    hist.optimizer = opt
    return hist


def _check_data(net, ds, where):
    """Labels in range for a classifier, and finite float samples (the API gets the CLI's errors)."""
    from .data import check_finite, check_labels
    if getattr(net.loss_layer, "targets", "labels") == "labels":
        check_labels(ds, net.loss_layer.out[0], where)
    check_finite(ds, ds.source if ds.source != "arrays" else where)


def _metric(r):
    """The number early stopping and best.npz follow: test_acc, else -test_loss, else -train_loss."""
    if math.isfinite(r["test_acc"]):
        return "test_acc", r["test_acc"]
    if math.isfinite(r["test_loss"]):
        return "test_loss", -r["test_loss"]
    return "train_loss", -r["train_loss"]


def _best_of(rows):
    """(metric name, 1-based epoch of its best value) over the history rows."""
    name = _metric(rows[-1])[0]
    best = max(range(len(rows)), key=lambda i: (_metric(rows[i])[1], -i))
    return name, int(rows[best]["epoch"])


def _kernel_summary(net, opt):
    """'conv (rows), maxpool, dense, adam': what the kernels being compiled are for."""
    seen = []
    for l in net.layers:
        algo = getattr(l, "algo", None)
        name = f"{l.kind} ({algo})" if isinstance(algo, str) else l.kind   # a layer with algorithms names its own
        if name not in seen:
            seen.append(name)
    return ", ".join(seen + [opt.kind])


def _epoch_line(r, epochs):
    s = (f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  acc {r['train_acc']:.4f}")
    if math.isfinite(r["test_loss"]):
        s += f"  test_loss {r['test_loss']:.4f}"
    if math.isfinite(r["test_acc"]):
        s += f"  test_acc {r['test_acc']:.4f}"
    return s + f"  {r['img_per_s']:,.0f} img/s  {r['seconds']:.1f} s"


def _save(net, opt, hist, path, step, best, bad, seed, running=(0.0, 0.0, 0.0)):
    extra = {"meta.running": np.array(running, np.float64), "opt.m": opt.m, "opt.v": opt.v, "opt.t": np.array(opt.t, np.int64),
             "opt.kind": np.array(opt.kind), "meta.step": np.array(step, np.int64),
             "meta.best": np.array(best, np.float64), "meta.bad": np.array(bad, np.int64),
             "meta.seed": np.array(seed, np.int64), "meta.history": hist.as_array(),
             "meta.classes": np.array(hist.classes if hist.classes else [], dtype=str)}
    if hist.confusion is not None:
        extra["meta.confusion"] = hist.confusion
    if hist.best_confusion is not None:
        extra["meta.best_confusion"] = hist.best_confusion
    extra["meta.best_epoch"] = np.array(hist.best_epoch, np.int64)
    net.save(path, extra)


def _restore(net, opt, hist, path, world=None):
    if world is not None and world.size > 1:   # rank 0 reads the checkpoint and hands it to the others
        from .checkpoint import load_into, read
        got = None
        if world.root:
            try:
                got = ("ok", read(path))
            except FlowError as e:
                got = ("error", e.message)
        got = world.bcast(got)
        if got[0] == "error":
            raise FlowError(got[1])
        data = load_into(net, path, got[1])
    else:
        data = net.load_weights(path)
    try:
        if str(data["opt.kind"]) != opt.kind:
            raise FlowError(f"{path}: saved with optimizer {data['opt.kind']}, but the model now uses {opt.kind}")
        if data["opt.m"].shape != opt.m.shape:
            raise FlowError(f"{path}: optimizer state does not fit the model")
        opt.load_state({"m": data["opt.m"], "v": data["opt.v"], "t": data["opt.t"]})
        step = int(data["meta.step"])
        best = float(data["meta.best"])
        bad = int(data["meta.bad"])
        running = tuple(float(v) for v in data["meta.running"]) if "meta.running" in data else (0.0, 0.0, 0.0)
        for r in data["meta.history"]:
            hist.rows.append({c: (int(v) if c in ("epoch", "step") else float(v)) for c, v in zip(HISTORY_COLS, r)})
        if "meta.confusion" in data:
            hist.confusion = data["meta.confusion"]
        if "meta.best_confusion" in data:
            hist.best_confusion = data["meta.best_confusion"]
        hist.best_epoch = int(data["meta.best_epoch"]) if "meta.best_epoch" in data else 0
        if not hist.classes and data["meta.classes"].size:
            hist.classes = [str(c) for c in data["meta.classes"]]
    except KeyError as e:
        raise FlowError(f"{path}: not a training checkpoint (missing {e.args[0]}); it can be used with --weights") from None
    return step, best, bad, running


def write_log(hist, path):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(",".join(HISTORY_COLS) + "\n")
            for r in hist.rows:
                f.write(",".join(_csv(r[c]) for c in HISTORY_COLS) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise FlowError(f"cannot write {path}: {e.strerror or e}; training stopped "
                        f"(last.npz holds the last completed epoch)") from None


def _csv(v):
    if isinstance(v, int):
        return str(v)
    return "" if not math.isfinite(v) else f"{v:.6g}"
