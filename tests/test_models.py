"""The models match McMahan et al. 2017 (and the tabular ones their sizes); ndarray conversion
refuses mismatches."""

import numpy as np
import pytest
import torch

from fl_app.models import CNN, MLP, LogisticRegression, get_weights, num_parameters, set_weights


def test_cnn_has_the_papers_1_663_370_parameters_on_mnist():
    assert num_parameters(CNN([1, 28, 28], 10)) == 1_663_370


def test_mlp_is_the_2nn_784_200_200_10():
    assert num_parameters(MLP([1, 28, 28], 10)) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10


@pytest.mark.parametrize("shape", [[1, 28, 28], [1, 8, 8], [3, 32, 32]])
@pytest.mark.parametrize("cls", [MLP, CNN, LogisticRegression])
def test_models_map_every_dataset_shape_to_class_logits(cls, shape):
    assert cls(shape, 10)(torch.zeros(4, *shape)).shape == (4, 10)


def test_logistic_regression_is_one_linear_layer_from_features_to_class_logits():
    model = LogisticRegression([30], 2)
    assert num_parameters(model) == 30 * 2 + 2
    assert model(torch.zeros(4, 30)).shape == (4, 2)


def test_tabular_mlp_is_30_32_2_with_one_hidden_layer():
    assert num_parameters(MLP([30], 2, hidden=32, hidden_layers=1)) == 30 * 32 + 32 + 32 * 2 + 2
    with pytest.raises(ValueError, match="at least one hidden layer"):
        MLP([30], 2, hidden_layers=0)


def test_weights_round_trip_exactly():
    a, b = MLP([1, 8, 8], 10), MLP([1, 8, 8], 10)
    set_weights(b, get_weights(a))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_wrong_shape_or_names_are_refused_with_the_array_named():
    model = MLP([1, 8, 8], 10)
    weights = get_weights(model)
    bad = dict(weights, **{"net.1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'net.1.weight' has shape \(3, 3\)"):
        set_weights(model, bad)
    with pytest.raises(ValueError, match="missing"):
        set_weights(model, {k: v for k, v in weights.items() if k != "net.1.bias"})
