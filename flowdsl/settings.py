"""The `train { }` and `init { }` blocks: which keys exist and what each accepts. Pure Python, so
`flowdsl check` validates a whole file without importing the engine."""
from __future__ import annotations

from .args import P

SOURCES = {
    "images": (P("dir", "str"), P("size", "shape", None), P("color", "name", None, choices=("gray", "rgb")),
               P("fit", "name", "stretch", choices=("stretch", "crop", "pad")),
               P("bad", "name", "error", choices=("error", "skip"))),
    "idx": (P("images", "str"), P("labels", "str")),
    "npz": (P("file", "str"), P("x", "str", "x"), P("y", "str", "y")),
    "csv": (P("file", "str"), P("label", "int", 0)),   # a negative column counts from the end
    "fashion_mnist": (P("part", "name", "train", choices=("train", "test")),),
}
TEST_SOURCES = dict(SOURCES, split=(P("fraction", "float", lo=0.0, hi=1.0, lo_open=True, hi_open=True),))

OPTIMIZERS = {
    "sgd": (P("lr", "float", 0.01, lo=0.0, lo_open=True),),
    "momentum": (P("lr", "float", 0.01, lo=0.0, lo_open=True), P("mu", "float", 0.9, lo=0.0, hi=1.0, hi_open=True)),
    "adam": (P("lr", "float", 1e-3, lo=0.0, lo_open=True), P("beta1", "float", 0.9, lo=0.0, hi=1.0, hi_open=True),
             P("beta2", "float", 0.999, lo=0.0, hi=1.0, hi_open=True), P("eps", "float", 1e-8, lo=0.0, lo_open=True)),
    "adamw": (P("lr", "float", 1e-3, lo=0.0, lo_open=True), P("beta1", "float", 0.9, lo=0.0, hi=1.0, hi_open=True),
              P("beta2", "float", 0.999, lo=0.0, hi=1.0, hi_open=True), P("eps", "float", 1e-8, lo=0.0, lo_open=True),
              P("weight_decay", "float", 0.01, lo=0.0)),   # decoupled, as PyTorch's AdamW
    "rmsprop": (P("lr", "float", 1e-3, lo=0.0, lo_open=True), P("rho", "float", 0.9, lo=0.0, hi=1.0, hi_open=True),
                P("eps", "float", 1e-8, lo=0.0, lo_open=True)),
}

SCHEDULES = {
    "constant": (P("warmup", "int", 0, lo=0),),
    "step": (P("every", "int", lo=1), P("gamma", "float", 0.1, lo=0.0, lo_open=True), P("warmup", "int", 0, lo=0)),
    "cosine": (P("warmup", "int", 0, lo=0), P("min_lr", "float", 0.0, lo=0.0)),
    "onecycle": (P("max_lr", "float", None, lo=0.0, lo_open=True), P("pct", "float", 0.3, lo=0.0, hi=1.0, lo_open=True, hi_open=True)),
}

AUGMENTS = {
    "shift": (P("px", "extent", 2),),       # pixels, or a fraction of each side (shift(0.1): up to 10%)
    "hflip": (),
    "vflip": (),
    "rotate": (P("degrees", "float", 15.0, lo=0.0, hi=180.0, lo_open=True),
               P("fill", "name", "nearest", choices=("nearest", "zeros", "mirror", "reflect", "wrap"))),
    "zoom": (P("fraction", "float", 0.1, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
             P("fill", "name", "nearest", choices=("nearest", "zeros", "mirror", "reflect", "wrap"))),
    "cutout": (P("size", "int", 8, lo=1), P("p", "float", 1.0, lo=0.0, hi=1.0)),
    "noise": (P("std", "float", 0.05, lo=0.0, lo_open=True),),
    "flip_pixels": (P("n", "int", 5, lo=1),),
}

INITS = {
    "normal": (P("mean", "float", 0.0), P("std", "float", 0.01, lo=0.0, lo_open=True)),
    "uniform": (P("lo", "float", -0.05), P("hi", "float", 0.05)),
    "he": (),
    "glorot": (),
    "zeros": (),
    "constant": (P("value", "float", 0.0),),
    "kirsch": (),   # fixed edge filters for a field-3 conv: flowdsl.init.FIXED
    "sobel": (),
}

TRAIN = (
    P("data", "call", None, table=SOURCES),
    P("test", "call", None, table=TEST_SOURCES),
    P("optimizer", "call", None, table=OPTIMIZERS),
    P("schedule", "call", None, table=SCHEDULES),
    P("batch", "int", 32, lo=1),
    P("epochs", "int", None, lo=1),
    P("iterations", "int", None, lo=1),
    P("l2", "float", 0.0, lo=0.0),
    P("seed", "int", 0, lo=0),
    P("augment", "calls", (), table=AUGMENTS),
    P("checkpoint", "str", None),
    P("patience", "int", None, lo=1),
    P("threads", "int", None, lo=1),
)

BLOCKS = ("train", "init")
