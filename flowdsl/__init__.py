"""flowdsl: a declarative neural-network language (NeuroFlow style) with numba CPU kernels.

    import flowdsl
    net = flowdsl.parse("conv(28x28x1, filters=8) :: dense(10) :: softmax")
    print(net.summary())
"""
from . import parse as _syntax  # noqa: F401  load the submodule first: the function below
from .errors import FlowError      # must own the name `flowdsl.parse`, not the module

__version__ = "0.1.0"


def parse(text: str, file: str | None = None, weights=None, seed=None):
    """A runnable network (flowdsl.net.Net) from .flow source text."""
    from .model import build_text
    from .net import Net
    net = Net(build_text(text, file), seed=seed)
    if weights is not None:
        net.load_weights(weights)
    return net


def load(path, weights=None, seed=None):
    """A runnable network from a .flow file, optionally with weights from a checkpoint."""
    from .model import load_model
    from .net import Net
    net = Net(load_model(path), seed=seed)
    if weights is not None:
        net.load_weights(weights)
    return net


__all__ = ["FlowError", "parse", "load", "__version__"]
