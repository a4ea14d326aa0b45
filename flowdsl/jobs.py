"""What the train, eval and predict verbs do, given a model and command-line choices:
resolve the train settings with overrides, load the data, run, write the outputs."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

from .args import CallValue, bind
from .data import base_dir, class_names, parse_source
from .errors import FlowError, UsageError, size_text
from .memory import check_training, data_budget
from .parse import Arg, Block, parse_text
from .settings import TRAIN


def apply_overrides(model, overrides: dict):
    """Train settings with command-line values (text in .flow syntax) replacing the file's.
    `lr` replaces the optimizer's learning rate."""
    settings = dict(model.train)
    over = {k: v for k, v in overrides.items() if v is not None and k != "lr"}
    if over:
        text = "train {\n" + "\n".join(f"  {k} = {v}" for k, v in over.items()) + "\n}\n"
        try:
            prog = parse_text(text, "<command line>")
        except FlowError as e:
            raise UsageError(f"bad command-line value: {e.message}") from None
        block = next(s for s in prog.statements if isinstance(s, Block))
        args = [Arg(s.key, s.value, s.pos) for s in block.settings]
        try:
            vals = bind("train", TRAIN, args, block.pos)
        except FlowError as e:
            raise UsageError(f"bad command-line value: {e.message}") from None
        for k in over:
            settings[k] = vals[k]
        if "epochs" in over:
            settings["iterations"] = None
        if "iterations" in over:
            settings["epochs"] = None
    if overrides.get("lr") is not None:
        try:
            lr = float(overrides["lr"])
            if not lr > 0 or not math.isfinite(lr):
                raise ValueError
        except ValueError:
            raise UsageError(f"--lr must be a positive number. Received: {overrides['lr']}") from None
        opt = settings["optimizer"] or CallValue("adam", (("lr", 1e-3), ("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-8)))
        settings["optimizer"] = CallValue(opt.name, tuple((k, lr if k == "lr" else v) for k, v in opt.args))
    return settings


def load_data(model, settings, classes=None, budget=None, say=None):
    """(train Dataset, test Dataset or None) from the settings' data and test sources; budget:
    bytes of RAM they may take together (image folders beyond it stream from their cache)."""
    from .data import check_labels, load_source, split
    if settings["data"] is None:
        raise FlowError("no training data: add `data = ...` to the train block (e.g. data = fashion_mnist(\"train\")) "
                        "or pass --data", model.file)
    bd = base_dir(model)
    try:
        train = load_source(settings["data"], bd, model.input_shape, classes=classes, budget=budget, say=say)
    except FlowError as e:
        raise _positioned(model, "data", settings["data"], e) from None
    test = None
    t = settings["test"]
    if t is not None and t.name == "split":
        train, test = split(train, t["fraction"], settings["seed"])
    elif t is not None:
        # the test set must name its classes as the training set does (images folders)
        left = None if budget is None else max(0, budget - train.resident_bytes)
        try:
            test = load_source(t, bd, model.input_shape, budget=left, say=say,
                               classes=classes or (train.classes if t.name == "images" else None))
        except FlowError as e:
            raise _positioned(model, "test", t, e) from None
    loss = model.layers[-1]
    if getattr(loss, "targets", "labels") == "labels":
        check_labels(train, loss.out[0], train.source)
        if test is not None:
            check_labels(test, loss.out[0], test.source)
    return train, test


def describe_data(model):
    """Lines for `flowdsl check`: each data source's size and whether it is held in memory or
    streamed, and the training estimate with it. A missing folder or file is an error at the
    position of its source in the .flow file."""
    from .data import STREAMING, describe_source
    from .memory import data_budget, train_estimate
    lines = []
    budget = data_budget(model, model.train["batch"])
    resident = 0
    for key in ("data", "test"):
        call = model.train.get(key)
        if call is None or call.name == "split":
            continue
        try:
            n, per = describe_source(call, base_dir(model), model.input_shape)
        except FlowError as e:
            lines.append(_positioned(model, key, call, e).render().replace("error:", "warning:", 1)
                         + "\n  (the model is fine; training will stop here until the data exists)")
            continue
        if n is None:
            lines.append(f"{key}: {call} ({size_text(per)} file, held in memory)")
            resident += per
            continue
        total = n * per
        streams = call.name in STREAMING and budget is not None and total > max(0, budget - resident)
        if not streams:
            resident += total
        lines.append(f"{key}: {n:,} samples, {size_text(total)} as uint8 "
                     f"({'streamed from the cache' if streams else 'in memory'})")
    if resident or any(not line.startswith(model.file or "\0") for line in lines):
        est = train_estimate(model, model.train["batch"], resident)
        lines.append(f"Training memory at batch {model.train['batch']} with the data in memory: about "
                     f"{size_text(est)} (estimated)")
    return lines


def _positioned(model, key, call, e):
    """A data error that names no file of its own, at the position of its source setting."""
    if e.file is not None and e.line is None and e.file != model.file:
        return e
    return model.error_at(key, f"{key} = {call}: {e.message}")


def model_name(model):
    return Path(model.file).stem if model.file else "model"


RUN_FILES = ("last.npz", "best.npz", "log.csv")


def free_run_folder(out, say=None):
    """`out` if it holds no earlier run's checkpoints, else the first free `out-2`, `out-3`, ...
    (as Lightning's version folders): a new run never replaces an earlier one's files unless
    asked (--overwrite)."""
    def used(d):
        return any(os.path.exists(os.path.join(d, f)) for f in RUN_FILES)
    if not used(out):
        return out
    base, k = out.rstrip("/\\") or out, 2
    while used(f"{base}-{k}"):
        k += 1
    new = f"{base}-{k}"
    if say:
        say(f"{out}/ holds an earlier run: writing {new}/ instead (--overwrite replaces the earlier run)")
    return new


def run_train(model, out=None, resume=None, overrides=None, verbose=1, overwrite=False):
    from . import jit
    from .net import Net
    from .report import write_report
    from .train import fit

    from .dist import threads_per_rank, world
    w = world()
    settings = apply_overrides(model, overrides or {})
    out = out or (settings["checkpoint"] and os.path.join(base_dir(model), settings["checkpoint"])) or \
        os.path.join("runs", model_name(model))
    # one writer: rank 0 prints, chooses the run folder and writes it; the other ranks compute
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if w.root else (lambda s: None)  # noqa: E731
    if resume is None and not overwrite and w.root:
        out = free_run_folder(out, say)
    out = w.bcast(out)
    if w.root:
        _check_writable(out)
    check_training(model, 1, "--batch ")  # before loading anything: a model that cannot train one sample
    # ranks on one host share its cores: mpiexec -n 2 on 2 cores runs 1 kernel thread each
    threads = jit.threads(settings["threads"] or (threads_per_rank() if w.size > 1 else None))
    # every rank loads (and reads only its rows when streaming); a data error is reported once
    train, test = w.agree(lambda: load_data(model, settings, budget=data_budget(model, settings["batch"]), say=say))
    resident = train.resident_bytes + (test.resident_bytes if test is not None else 0)
    # with the data loaded (available memory now counts it)
    check_training(model, max(1, min(settings["batch"], len(train))), "--batch ")
    net = Net(model, seed=settings["seed"])
    mode = "streamed from the cache" if train.streamed else f"{size_text(resident)} in memory"
    ranks = f"; {w.size} MPI ranks x {threads} threads (batch {settings['batch']} in all)" if w.size > 1 else \
        f"; {threads} threads"
    say(f"{model_name(model)}: {model.n_params():,} weights; train {len(train):,} samples "
        f"({train.source}; {mode}); test {len(test) if test else 0:,}; batch {settings['batch']}"
        f"{ranks}; writing {out}/")
    hist = fit(net, train, None, test,
               epochs=settings["epochs"], iterations=settings["iterations"], batch=settings["batch"],
               optimizer=settings["optimizer"], schedule=settings["schedule"], l2=settings["l2"],
               seed=settings["seed"], augment=settings["augment"], patience=settings["patience"],
               out_dir=out, resume=resume, classes=train.classes, verbose=verbose, log=say,
               checkpoint_every=None)
    if not w.root:
        return hist
    try:
        write_report(hist, os.path.join(out, "report.png"), title=f"{model_name(model)}: {model.n_params():,} weights")
    except OSError as e:
        raise FlowError(f"cannot write {os.path.join(out, 'report.png')}: {e.strerror or e} "
                        f"(the checkpoints and log.csv are written)") from None
    if hist.rows:
        r = hist.rows[-1]
        best = max((x["test_acc"] for x in hist.rows if math.isfinite(x["test_acc"])), default=float("nan"))
        say(f"{'stopped' if hist.signal else 'done'}: {hist.step} steps; last train_loss {r['train_loss']:.4f}"
            + (f"; best test_acc {best:.4f}" if math.isfinite(best) else "")
            + f". Wrote {out}/last.npz, best.npz, log.csv, report.png")
    return hist


def _class_index(cls, classes, k):
    """--class K or NAME -> an index, or None (the predicted class)."""
    if cls is None:
        return None
    if str(cls).lstrip("-").isdigit():
        c = int(cls)
    elif str(cls) in classes:
        c = classes.index(str(cls))
    else:
        from .errors import closest
        near = closest(str(cls), classes)
        raise FlowError(f"no class named '{cls}'" + (f" (did you mean '{near}'?)" if near else "")
                        + (f"; the classes are: {', '.join(classes)}" if classes else "; give its index"))
    if not 0 <= c < k:
        raise FlowError(f"--class {cls}: the network has {k} classes (0..{k - 1})")
    return c


def _where_it_looks(model, net, classes, layers, inputs, out, gradcam, method, cls, saliency, filters):
    from .data import load_image_files
    from .focus import filters_png, write_heat
    out = out or os.path.join("runs", model_name(model), "focus")
    _check_writable(out)
    if len(layers) > 1:
        raise FlowError(f"--gradcam and --filters look at one layer at a time; received {', '.join(layers)}")
    layer = layers[0] if layers else None
    if layer is not None:
        try:
            layer = model.layer(layer).name if layer not in model.aliases else layer
        except KeyError:
            raise FlowError(f"no layer named '{layer}'; layers: {', '.join(model.names())}") from None
    paths = []
    k = model.layers[-1].out[0]
    c = _class_index(cls, classes, k)
    if gradcam or saliency:
        if not inputs:
            raise FlowError("give the images to look at: --input IMG...")
        x = load_image_files(inputs, model.input_shape)
        stems = [Path(p).stem for p in inputs]
        if len(set(stems)) < len(stems):
            stems = [f"{i}-{s}" for i, s in enumerate(stems)]
        probs = net.predict(x)
        label = class_names(classes, k)
        for i, nm in enumerate(stems):
            ci = int(probs[i].argmax()) if c is None else c
            print(f"{nm}: looking at class {label[ci]} (p = {probs[i][ci]:.3f})")
        if gradcam:
            at = layer or net.default_cam_layer()
            maps = net.gradcam(x, at, c, method)
            got, empty = write_heat(maps, x, out, f"{at}-{method}", stems)
            paths += got
            for nm in empty:
                print(f"note: the {method} map of {at} is zero everywhere for {nm}: no positive evidence "
                      f"for that class at this layer (drawn black; try --method hirescam or another --layer)")
        if saliency:
            got, _ = write_heat(net.saliency(x, c), x, out, "saliency", stems)
            paths += got
    if filters:
        if layer is None:
            raise FlowError("--filters draws one conv layer's filters: say which with --layer NAME")
        paths.append(filters_png(net.filter_images(layer), out, layer))
    print(f"wrote {len(paths)} PNGs to {out}/")
    return paths


def _check_writable(out):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        raise FlowError(f"cannot write to the output folder {out}: {e.strerror or e}; choose another with --out") from None


def load_trained(model, weights):
    from .checkpoint import read
    from .net import Net
    net = Net(model, seed=0)
    data = net.load_weights(weights)
    classes = [str(c) for c in data.get("meta.classes", np.array([], dtype=str))]
    return net, classes


def run_eval(model, weights, data=None, perturb=None, out=None, tta=None, top=1):
    """weights: one checkpoint, or a list of several of the same model (an ensemble: each
    member's accuracy, then the ensemble's, classifying by the mean probabilities)."""
    from .data import check_labels, load_source
    from .net import check_tta
    from .train import evaluate
    from . import jit
    from .dist import threads_per_rank, world
    wd = world()
    check_tta(tta, model.input_shape)
    if out and wd.root:
        _check_writable(out)
    if wd.size > 1:   # under mpiexec: the samples are shared out, the counts reduced, rank 0 prints
        jit.threads(threads_per_rank())
    paths = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    loaded = [load_trained(model, w) for w in paths]
    net, classes = loaded[0]
    members = [m for m, _ in loaded]
    for m in members:
        m.world = wd if wd.size > 1 else None
    for w, (_, c) in zip(paths[1:], loaded[1:]):
        if c and classes and c != classes:
            raise FlowError(f"{w} was trained on the classes {', '.join(c)}; {paths[0]} on "
                            f"{', '.join(classes)}: an ensemble needs the same classes")
    weights = paths[0] if len(paths) == 1 else f"ensemble of {len(paths)}"
    settings = dict(model.train)
    if data is not None:
        ds = load_source(parse_source(data, model), os.getcwd(), model.input_shape, classes=classes or None)
        dsname = ds.source
    else:
        _, test = load_data(model, settings, classes=classes or None)
        if test is None:
            raise FlowError("the model has no test set: add `test = ...` to its train block or pass --data")
        ds, dsname = test, test.source
    check_labels(ds, model.layers[-1].out[0], ds.source)
    classes = classes or ds.classes
    lines = [f"{dsname}: {len(ds):,} images"]
    if len(members) > 1:
        accs = []
        for j, (w, m) in enumerate(zip(paths, members)):
            r = evaluate(m, ds, check=j == 0, tta=tta)
            accs.append(r["acc"])
            lines.append(f"member {w}: accuracy {r['acc']:.4f}   loss {r['loss']:.4f}")
        res = evaluate(net, ds, check=False, top=top, members=members, tta=tta)
        best = max(accs)
        lines.append(f"ensemble of {len(members)} (mean probabilities): accuracy {res['acc']:.4f}   loss "
                     f"{res['loss']:.4f}   ({res['acc'] - best:+.4f} against the best member, {best:.4f})")
    else:
        res = evaluate(net, ds, top=top)
        lines.append(f"accuracy {res['acc']:.4f}   loss {res['loss']:.4f}")
    if tta and len(members) == 1:
        plain = res
        res = evaluate(net, ds, tta=tta, top=top)
        lines.append(f"with test-time augmentation ({tta}: each image and its mirror, mean probabilities): "
                     f"accuracy {res['acc']:.4f}   loss {res['loss']:.4f}   (without: {plain['acc']:.4f})")
    if perturb:
        from .augment import perturb as do_perturb
        shift, flip = perturb
        xp = do_perturb(ds.x, shift, flip, np.random.default_rng(0))
        pres = evaluate(net, xp, ds.y, tta=tta, members=members)
        how = f", with test-time augmentation ({tta})" if tta else ""
        lines.append(f"perturbed (shift up to {shift}px, {flip} pixels flipped{how}): accuracy {pres['acc']:.4f}   "
                     f"(clean {res['acc']:.4f})")
    if top > 1 and res.get("topk"):
        lines.append("   ".join(f"top-{i + 1} {a:.4f}" for i, a in enumerate(res["topk"])))
    lines.append(_per_class(res["confusion"], classes))
    lines.append(_conf_text(res["confusion"], classes))
    if not wd.root:
        return res
    print("\n".join(lines))
    if out:
        from .report import write_confusion
        _check_writable(out)
        png = os.path.join(out, "eval.png")
        try:
            write_confusion(res["confusion"], classes, png,
                            f"{os.path.basename(weights)} on {dsname}\naccuracy {res['acc']:.4f} ({len(ds):,} images)")
        except OSError as e:
            raise FlowError(f"cannot write {png}: {e.strerror or e}") from None
        print(f"wrote {png} (confusion matrix)")
        if len(model.input_shape) == 3 and getattr(net.loss_layer, "targets", "labels") == "labels":
            from .report import write_errors
            errs = os.path.join(out, "errors.png")
            # probabilities a batch at a time (N x classes is small); only the drawn images are
            # read again: a large image set is never turned into one float32 array
            probs = np.concatenate([net.predict(ds.batch(np.arange(i, min(len(ds), i + 256))),
                                                weights=members if len(members) > 1 else None)
                                    for i in range(0, len(ds), 256)])
            try:
                n = write_errors(ds.batch, ds.y, probs, classes, errs)
            except OSError as e:
                raise FlowError(f"cannot write {errs}: {e.strerror or e}") from None
            if n:
                print(f"wrote {errs} ({n} misclassified images, most confident first)")
    return res


def _per_class(conf, classes):
    k = conf.shape[0]
    names = class_names(classes, k)
    w = max(len(n) for n in names)
    out = [f"{'class'.ljust(w)}  precision  recall  count"]
    for i in range(k):
        tp = conf[i, i]
        prec = tp / conf[:, i].sum() if conf[:, i].sum() else float("nan")
        rec = tp / conf[i].sum() if conf[i].sum() else float("nan")
        out.append(f"{names[i].ljust(w)}  {prec:9.3f}  {rec:6.3f}  {conf[i].sum():5d}")
    return "\n".join(out)


def _conf_text(conf, classes):
    k = conf.shape[0]
    names = [n[:12] for n in class_names(classes, k)]
    w = max(max(len(str(conf.max())), max(len(n) for n in names)) + 1, 5)
    lw = max(len(n) for n in names)
    head = "confusion (rows true, columns predicted)\n" + " " * (lw + 1) + "".join(n.rjust(w) for n in names)
    rows = [names[i].rjust(lw) + " " + "".join(str(v).rjust(w) for v in conf[i]) for i in range(k)]
    return head + "\n" + "\n".join(rows)


def run_predict(model, weights, images, top=3, tta=None):
    from .data import load_image_files
    from .net import check_tta
    check_tta(tta, model.input_shape)
    paths = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    loaded = [load_trained(model, w) for w in paths]
    net, classes = loaded[0]
    x = load_image_files(images, model.input_shape)
    # several checkpoints: an ensemble, the mean of the members' probabilities
    probs = net.predict(x, tta=tta) if len(paths) == 1 else net.predict(x, tta=tta, weights=[m for m, _ in loaded])
    k = probs.shape[1]
    names = classes if len(classes) == k else [str(i) for i in range(k)]
    for path, p in zip(images, probs):
        order = np.argsort(-p)[:top]
        print(f"{path}: " + "  ".join(f"{names[i]} {p[i]:.3f}" for i in order))
    return probs


def run_focus(model, weights, layers, all_layers, inputs, out=None, kernels=False, scale="minmax",
              gradcam=False, method="gradcam", cls=None, saliency=False, filters=False):
    """Write focus PNGs for the given layers (or all) and input images. Returns the paths.
    gradcam / saliency / filters: where the net looks (flowdsl.net.Net.gradcam, .saliency,
    .filter_images) instead of (or besides) the activations."""
    from .data import load_image_files
    from .focus import kernel_png
    from .net import Net
    classes = []
    if weights:
        net, classes = load_trained(model, weights)
    else:
        net = Net(model)  # the initialised weights: the "before training" picture
    names = model.names()
    if gradcam or saliency or filters:
        return _where_it_looks(model, net, classes, layers, inputs, out, gradcam, method, cls, saliency, filters)
    if all_layers:
        chosen = [l.name for l in model.layers if l.role not in ("input", "loss")]
    else:
        if not layers:
            raise FlowError(f"say which layers to draw: --layer NAME (one of {', '.join(names)}) or --all")
        chosen = []
        for n in layers:
            try:
                model.layer(n)
            except KeyError:
                from .errors import closest
                near = closest(n, names)
                hint = f" (did you mean '{near}'?)" if near else ""
                raise FlowError(f"no layer named '{n}'{hint}; the layers are: {', '.join(names)}",
                                model.file) from None
            chosen.append(n)
    out = out or os.path.join("runs", model_name(model), "focus")
    _check_writable(out)
    paths = []
    if inputs:
        x = load_image_files(inputs, model.input_shape)
        stems = [Path(p).stem for p in inputs]
        if len(set(stems)) < len(stems):  # same file names in different folders: add the folder
            stems = [f"{Path(p).parent.name}-{Path(p).stem}" for p in inputs]
        if len(set(stems)) < len(stems):
            stems = [f"{i}-{s}" for i, s in enumerate(stems)]
        for n in chosen:
            net.focus(n, x, png_dir=out, names=stems, scale=scale)
        paths = sorted(str(p) for p in Path(out).glob("*.png"))
    elif not kernels:
        raise FlowError("give the images to look at: --input IMG... (or draw the filters with --kernels)")
    if kernels:
        convs = [model.layer(n) for n in chosen if model.layer(n).spatial_filters]
        if not convs:
            raise FlowError(f"--kernels draws conv layers' filters, and none of {', '.join(chosen)} is a conv layer")
        for l in convs:
            paths.append(kernel_png(l, net.params[l.name]["w"], out))
    print(f"wrote {len(paths)} PNGs to {out}/")
    return paths
