"""The layer registry. Each kind lives in its own module in this package and registers itself
with @register; modules are found automatically, so adding a kind touches one new file."""
from __future__ import annotations

import importlib
import pkgutil

REGISTRY: dict = {}     # kind name -> class
ALIASES: dict = {}      # alias -> kind name
CALL_ALIASES: dict = {} # alias that applies only when written with arguments, e.g. linear(10) -> dense


def register(kind: str, aliases=(), call_aliases=()):
    def deco(cls):
        global _activations
        _activations = None
        cls.kind = kind
        REGISTRY[kind] = cls
        for a in aliases:
            ALIASES[a] = kind
        for a in call_aliases:
            CALL_ALIASES[a] = kind
        return cls
    return deco


_loaded = False


def load_all():
    global _loaded
    if _loaded:
        return
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_") and m.name != "base":
            importlib.import_module(f"{__name__}.{m.name}")
    _loaded = True


def lookup(name: str, called_with_args: bool):
    """The class for a kind name or alias, or None."""
    load_all()
    if called_with_args and name in CALL_ALIASES:
        return REGISTRY[CALL_ALIASES[name]]
    if name in REGISTRY:
        return REGISTRY[name]
    if name in ALIASES:
        return REGISTRY[ALIASES[name]]
    return None


def all_names():
    load_all()
    return set(REGISTRY) | set(ALIASES) | set(CALL_ALIASES)


_activations = None  # activation_table(), rebuilt after any register()


def activation_table():
    """{name: params} of every activation kind (for act=...)."""
    global _activations
    load_all()
    if _activations is None:
        out = {}
        for n in all_names():
            cls = lookup(n, False)
            if cls is not None and cls.role == "activation":
                out[n] = cls.params
        _activations = out
    return _activations
