"""How much each layer's features vary over the rows (`hlora.evaluation.predict(features=True)`): the
instrument that says where a global model that answers every row alike lost its input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.evaluation import FLAT_FEATURES, _FeatureMoments, features_line, predict
from hlora.federation.prepared import prepare


def direct_variation(hidden: np.ndarray, mask: np.ndarray) -> float:
    """Every row at once: the token average of each row, then total variance over mean squared norm."""
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    second = (pooled**2).mean(0).sum()
    return float(pooled.var(0).sum() / second)


@settings(deadline=None, derandomize=True, max_examples=60)
@given(
    rows=st.integers(2, 12),
    tokens=st.integers(1, 6),
    width=st.integers(1, 5),
    batch=st.integers(1, 12),
    offset=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
)
def test_moments_over_batches_give_the_variation_of_all_rows_at_once(
    rows, tokens, width, batch, offset, seed
):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(rows, tokens, width)) + offset
    lengths = rng.integers(1, tokens + 1, size=rows)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.float64)
    moments = _FeatureMoments()
    for start in range(0, rows, batch):  # what predict sees: batches of rows, each layer's states
        part = slice(start, start + batch)
        states = torch.tensor(hidden[part])
        layers = (states, 2 * states, torch.ones(len(states), tokens, width))
        moments.add(layers, torch.tensor(mask[part]))
    got = moments.variation()
    want = direct_variation(hidden, mask)
    assert got[0] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[1] == pytest.approx(want, rel=1e-9, abs=1e-12)  # scale-free
    assert got[2] == pytest.approx(0.0, abs=1e-12) and 0 <= got[0] <= 1  # a constant layer varies not at all


def test_no_rows_no_variation():
    assert _FeatureMoments().variation() is None


@pytest.fixture
def exp(tiny_settings):
    return prepare(tiny_settings)


def test_predict_gives_a_variation_per_hidden_state_and_the_same_logits(exp):
    module = exp.model.module
    plain = predict(module, exp.dev, 16, exp.collate, "cpu")
    seen = predict(module, exp.dev, 16, exp.collate, "cpu", features=True)
    assert plain.feature_variation is None
    np.testing.assert_array_equal(seen.logits, plain.logits)
    layers = module.config.num_hidden_layers  # the tiny BERT: 2 layers, so embeddings + 2
    assert len(seen.feature_variation) == layers + 1
    assert all(FLAT_FEATURES < v <= 1 for v in seen.feature_variation)  # a random model sees its input
    assert predict(module, exp.dev, 5, exp.collate, "cpu", features=True).feature_variation == pytest.approx(
        seen.feature_variation, rel=1e-6
    )  # batching changes nothing but round-off


def test_a_last_layer_that_maps_every_row_to_one_vector_is_flat(exp):
    module = exp.model.module
    norm = [m for name, m in module.named_modules() if name.endswith("layer.1.output.LayerNorm")][0]
    with torch.no_grad():
        norm.weight.zero_()  # the layer's output is its LayerNorm's bias, whatever the input
    seen = predict(module, exp.dev, 16, exp.collate, "cpu", features=True)
    assert seen.feature_variation[-1] < 1e-12 < FLAT_FEATURES < seen.feature_variation[-2]
    assert np.ptp(seen.logits, axis=0).max() < 1e-5  # the head gets one vector: one answer
    line = features_line(seen.feature_variation)
    assert line.startswith("features vary by layer, embeddings first: ")
    assert line.endswith("(flat from hidden state 2 on: every row reaches the head as the same vector)")


def test_features_line_names_where_the_flat_layers_begin():
    assert features_line([0.5, 0.3, 0.2]) == "features vary by layer, embeddings first: 0.5 0.3 0.2"
    assert features_line([0.5, 1e-4, 0.2]) == "features vary by layer, embeddings first: 0.5 0.0001 0.2"
    assert features_line([0.5, 0.01, 4e-7, 2e-8]).endswith("(flat from hidden state 2 on: every row reaches "
                                                           "the head as the same vector)")  # fmt: skip
