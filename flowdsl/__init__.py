"""flowdsl: a declarative neural-network language (NeuroFlow style) with numba CPU kernels.

    import flowdsl
    net = flowdsl.parse("conv(28x28x1, filters=8) :: dense(10) :: softmax")
    print(net.summary())
"""
from .errors import FlowError

__version__ = "0.1.0"


def parse(text: str, file: str | None = None):
    """Build a model from .flow source text."""
    from .model import build_text
    return build_text(text, file)


def load(path):
    """Build a model from a .flow file."""
    from .model import load_model
    return load_model(path)


__all__ = ["FlowError", "parse", "load", "__version__"]
