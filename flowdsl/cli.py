"""The `flowdsl` command. Every user error exits 1 with one positioned message; usage errors
exit 2; a Python traceback appears only with --debug."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import FlowError, UsageError


def _positive(v):
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return n


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"flowdsl: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _cmd_check(a):
    from .model import load_model
    from .jobs import describe_data
    m = load_model(a.file)
    data = describe_data(m)
    print(f"{a.file}: ok")
    print(m.summary())
    for line in data:
        print(line, file=sys.stderr if line.startswith(("warning", a.file)) else sys.stdout)
    return 0


def _cmd_bench(a):
    if a.cold:
        import tempfile
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="flowdsl-cold-cache-")
    from .bench import run
    from .model import load_model
    m = load_model(a.file)
    run(m, batch=a.batch, threads=a.threads, infer_batch=a.infer_batch, repeats=a.repeats)
    return 0


def _cmd_train(a):
    from .jobs import run_train
    from .model import load_model
    from .settings import TRAIN
    m = load_model(a.file)
    over = {p.name: getattr(a, p.name, None) for p in TRAIN}
    over["lr"] = a.lr
    hist = run_train(m, out=a.out, resume=a.resume, overrides=over, verbose=2 if a.quiet_bar else 1,
                     overwrite=a.overwrite)
    # stopped by Ctrl-C or SIGTERM (after saving): exit as a shell reports a signal, 130 or 143,
    # so that a script can tell an interrupted run from a finished one
    return 128 + hist.signal if hist.signal else 0


def _kernels_note():
    """A KernelClock that says so when kernels compile (eval, predict and focus on a fresh install)."""
    from .jit import KernelClock, cache_dir
    return KernelClock(on_compile=lambda name: print(
        f"compiling kernels (first run only, about 10-60 s; cached in {cache_dir()})", file=sys.stderr, flush=True))


def _cmd_eval(a):
    from .jobs import run_eval
    from .model import load_model
    m = load_model(a.file)
    with _kernels_note():
        run_eval(m, a.weights if len(a.weights) > 1 else a.weights[0], data=a.data, perturb=_perturb(a.perturb) if a.perturb else None, out=a.out,
                 tta=a.tta, top=a.top)
    return 0


def _perturb(text):
    vals = {"shift": 0, "flip": 0}
    for part in text.split(","):
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in vals or not v.strip().isdigit():
            raise UsageError(f"--perturb takes shift=N,flip=N (e.g. shift=2,flip=5). Received: {text}")
        vals[k] = int(v)
    return vals["shift"], vals["flip"]


def _cmd_predict(a):
    from .jobs import run_predict
    from .model import load_model
    # `--weights a.npz b.npz img.png ...`: --weights takes several checkpoints, so images written
    # after it land there; the checkpoints are the leading .npz files, the rest are images
    weights, images = list(a.weights), list(a.images)
    cut = next((i for i, w in enumerate(weights) if i and not w.lower().endswith(".npz")), len(weights))
    weights, images = weights[:cut], weights[cut:] + images
    if not images:
        raise UsageError("predict needs images: flowdsl predict FILE IMG... --weights CKPT...")
    m = load_model(a.file)
    with _kernels_note():
        run_predict(m, weights if len(weights) > 1 else weights[0], images, top=a.top, tta=a.tta)
    return 0


def _cmd_export(a):
    from .jobs import load_trained
    from .model import load_model
    m = load_model(a.file)
    net, _ = load_trained(m, a.weights)
    out = a.out or os.path.splitext(a.file)[0] + ".onnx"
    net.export_onnx(out, a.layout)
    print(f"wrote {out} ({a.layout.upper()} input, opset 17)")
    return 0


def _cmd_import(a):
    from .onnx_import import to_model
    flow = a.out or os.path.splitext(a.file)[0] + ".flow"
    weights = os.path.splitext(flow)[0] + ".npz"
    model, net, text = to_model(a.file)
    try:
        with open(flow, "w") as f:
            f.write(f"# imported from {os.path.basename(a.file)} by flowdsl import; weights in "
                    f"{os.path.basename(weights)}\n" + text)
    except OSError as e:
        raise FlowError(f"cannot write {flow}: {e.strerror or e}") from None
    net.save(weights)
    print(f"wrote {flow} ({len(model.layers)} layers, {model.n_params():,} weights) and {weights}")
    print(f"next: flowdsl check {flow}; flowdsl focus {flow} --weights {weights} --all --input IMG")
    return 0


def _cmd_focus(a):
    from .jobs import run_focus
    from .model import load_model
    m = load_model(a.file)
    with _kernels_note():
        run_focus(m, a.weights, a.layer, a.all, a.input, out=a.out, kernels=a.kernels, scale=a.scale,
                  gradcam=a.gradcam, method=a.method, cls=a.cls, saliency=a.saliency, filters=a.filters)
    return 0


def make_parser():
    p = _Parser(prog="flowdsl", description="A declarative language for convolutional networks.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    c = sub.add_parser("check", help="parse, infer shapes and print the layout")
    c.add_argument("file")
    c.set_defaults(run=_cmd_check)
    from .settings import TRAIN
    t = sub.add_parser("train", help="train, evaluate each epoch, write checkpoints and a report",
                       description="Train the model of FILE with its train block (options below override "
                                   "it). The first run compiles the kernels it needs (it says so; about "
                                   "10-60 s, depending on the layers) and caches them: later runs start "
                                   "in a few seconds.")
    t.add_argument("file")
    t.add_argument("--out", help="output folder (default: runs/<model name>/; a folder that holds an earlier run "
                                 "becomes <folder>-2, -3, ...)")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in the output folder")
    t.add_argument("--resume", metavar="CKPT", help="continue a run from its last.npz")
    t.add_argument("--lr", help="learning rate (replaces the optimizer's)")
    t.add_argument("--quiet-bar", action="store_true", help="one line per epoch even on a terminal")
    for opt in TRAIN:
        t.add_argument(f"--{opt.name}", metavar="VALUE", help=f"override the train block's {opt.name} (.flow syntax)")
    t.set_defaults(run=_cmd_train)
    e = sub.add_parser("eval", help="accuracy, per-class precision/recall, confusion matrix")
    e.add_argument("file")
    e.add_argument("--weights", required=True, metavar="CKPT", nargs="+",
                   help="a checkpoint, or several of the same model: an ensemble (mean probabilities)")
    e.add_argument("--top", type=_positive, default=1, metavar="K",
                   help="also print top-1 .. top-K accuracy (the true class among the K best guesses)")
    e.add_argument("--data", metavar="SRC", help='a data source, e.g. \'fashion_mnist("test")\' (default: the test set)')
    e.add_argument("--perturb", metavar="shift=N,flip=N", help="also evaluate on shifted inputs with flipped pixels")
    e.add_argument("--out", help="write eval.png (confusion matrix) here")
    e.add_argument("--tta", metavar="hflip", help="test-time augmentation: also average each image's mirror image")
    e.set_defaults(run=_cmd_eval)
    pr = sub.add_parser("predict", help="top classes with probabilities for each image")
    pr.add_argument("file")
    pr.add_argument("--weights", required=True, metavar="CKPT", nargs="+",
                    help="a checkpoint, or several of the same model: an ensemble (the leading .npz "
                         "files; what follows them is taken as images)")
    pr.add_argument("--top", type=_positive, default=3)
    pr.add_argument("--tta", metavar="hflip", help="test-time augmentation: also average each image's mirror image")
    pr.add_argument("images", nargs="*", metavar="IMG")
    pr.set_defaults(run=_cmd_predict)
    ex = sub.add_parser("export", help="write the trained network as an ONNX file")
    ex.add_argument("file")
    ex.add_argument("--weights", required=True, metavar="CKPT")
    ex.add_argument("--out", metavar="FILE", help="the ONNX file (default: FILE with .onnx)")
    ex.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc",
                    help="the input's layout: NHWC (default, as flowdsl's images) or NCHW (PyTorch's)")
    ex.set_defaults(run=_cmd_export)
    im = sub.add_parser("import", help="turn an ONNX CNN into .flow source and weights")
    im.add_argument("file", metavar="MODEL.onnx")
    im.add_argument("--out", metavar="FILE.flow", help="the .flow file (default: MODEL.flow; weights beside it, .npz)")
    im.set_defaults(run=_cmd_import)
    fo = sub.add_parser("focus", help="write a layer's activations as PNGs")
    fo.add_argument("file")
    fo.add_argument("--weights", metavar="CKPT", help="trained weights (default: the initialised ones)")
    fo.add_argument("--layer", nargs="+", metavar="NAME", default=[], help="layers to draw")
    fo.add_argument("--all", action="store_true", help="draw every layer")
    fo.add_argument("--input", nargs="+", metavar="IMG", default=[], help="input images")
    fo.add_argument("--out", help="output folder (default: runs/<model name>/focus/)")
    fo.add_argument("--kernels", action="store_true", help="also draw conv layers' learned filters (red +, blue -)")
    fo.add_argument("--gradcam", action="store_true",
                    help="where the net looks: Grad-CAM of --layer (default: the last map larger than 1x1)")
    fo.add_argument("--method", choices=("gradcam", "hirescam"), default="gradcam",
                    help="gradcam (channel weights) or hirescam (gradient x activation, for few channels)")
    fo.add_argument("--class", dest="cls", metavar="K|NAME", help="the class to explain (default: the predicted one)")
    fo.add_argument("--saliency", action="store_true", help="|d class score / d pixel|, as a map and an overlay")
    fo.add_argument("--filters", action="store_true",
                    help="for each filter of the conv --layer, the input that excites it most (gradient ascent)")
    fo.add_argument("--scale", choices=("minmax", "percentile"), default="minmax",
                    help="map brightness: each map's min..max (default) or its 1st..99th percentile, clipped "
                         "(for deep layers that come out almost black)")
    fo.set_defaults(run=_cmd_focus)
    b = sub.add_parser("bench", help="training and inference images/s, time per layer")
    b.add_argument("file")
    b.add_argument("--batch", type=_positive, default=None, help="training batch (default: the file's)")
    b.add_argument("--infer-batch", type=_positive, default=256)
    b.add_argument("--threads", type=_positive, default=None, help="threads (default: all cores)")
    b.add_argument("--repeats", type=_positive, default=7)
    b.add_argument("--cold", action="store_true", help="compile into an empty cache (measures compile time)")
    b.set_defaults(run=_cmd_bench)
    return p, sub


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLOWDSL_DEBUG") == "1"
    if "--debug" in argv[1:]:  # accepted anywhere, also after the verb: `check x.flow --debug`
        argv = [argv[0]] + [x for x in argv[1:] if x != "--debug"]
    parser, _ = make_parser()
    try:
        a = parser.parse_args(argv)
        if not getattr(a, "run", None):
            parser.print_help(sys.stderr)
            return 2
        return a.run(a) or 0
    except FlowError as e:
        if debug:
            raise
        print(e.render(), file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("flowdsl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the environment, not flowdsl: a full disk, a path that cannot exist, ...
        if debug:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"flowdsl: error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except MemoryError:
        if debug:
            raise
        print("flowdsl: error: out of memory; try a smaller --batch", file=sys.stderr)
        return 1
    except Exception as e:  # a bug of ours: say so plainly, without a traceback
        if debug:
            raise
        print(f"flowdsl: internal error: {type(e).__name__}: {e}\n"
              f"(this is a bug in flowdsl; run again with --debug for the traceback)", file=sys.stderr)
        return 1


def entry():
    sys.exit(main())
