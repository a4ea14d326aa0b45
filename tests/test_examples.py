"""Every example is a program: it checks, and a short smoke run (a few hundred images, one
epoch) of each trains without error, so none of them silently breaks."""
from pathlib import Path

import numpy as np
import pytest

import flowdsl
from flowdsl.jobs import load_data
from flowdsl.model import load_model

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.flow"))
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_there_are_examples():
    names = {p.stem for p in EXAMPLES}
    assert {"seed", "glasses", "letters", "nielsen", "fashion", "hellodl"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_smoke_run(path):
    model = load_model(path)
    net = flowdsl.load(path)
    data = model.train["data"]
    if data is not None and data.name == "fashion_mnist" and not FASHION.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    if data is not None and (data.name != "idx"):
        train, test = load_data(model, model.train)
        x, y = train.x[:256], train.y[:256]
    else:  # no data shipped (letters: EMNIST is not packaged): random images of the right shape
        rng = np.random.default_rng(0)
        c, h, w = model.input_shape
        x = rng.random((64, h, w, c), dtype=np.float32)
        y = rng.integers(0, model.layers[-1].out[0], 64)
    h = net.fit(x, y, epochs=1, batch=32)
    assert len(h.rows) == 1 and np.isfinite(h["train_loss"][0])
    probs = net.predict(x[:8])
    assert probs.shape == (8, model.layers[-1].out[0])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
