"""Models of McMahan et al. 2017, tabular models, and the conversions between torch state_dicts
and ndarrays."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from math import prod

import numpy as np
import torch
from torch import nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer from the flattened input to the class
    logits (softmax in the cross-entropy loss); (features + 1) * classes parameters."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP(nn.Module):
    """Fully connected, ReLU: by default the "2NN", input -> 200 -> 200 -> classes (199,210
    parameters on MNIST); `hidden_layers=1, hidden=32` is a small tabular MLP."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 200,
                 hidden_layers: int = 2) -> None:
        super().__init__()
        if hidden_layers < 1:
            raise ValueError(f"hidden_layers={hidden_layers}: an MLP needs at least one hidden "
                             "layer (model=logreg has none).")
        layers: list[nn.Module] = [nn.Flatten()]
        width = prod(input_shape)
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two 5x5 conv layers (32, 64) with 2x2 max pooling, a 512-unit dense layer, softmax.

    'Same' padding keeps 28x28 -> 14x14 -> 7x7, which gives the paper's 1,663,370 parameters.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CharLSTM(nn.Module):
    """The next-character model of McMahan et al. 2017 (Shakespeare): each character id is
    embedded in `embedding_dim` dimensions, read by `layers` stacked LSTM layers of `hidden`
    units, and the last step's output gives the logits of the next character (softmax in the
    loss). 824,425 parameters with 8, 256, 2 and a 97-character vocabulary.

    `tokens` marks a model that reads character ids, not images or features; fl_app.config
    pairs it with a dataset whose inputs are tokens.
    """

    def __init__(self, num_classes: int, embedding_dim: int = 8, hidden: int = 256,
                 layers: int = 2, tokens: bool = True) -> None:
        super().__init__()
        if not tokens:
            raise ValueError("CharLSTM reads character ids: tokens must be true.")
        self.embedding = nn.Embedding(num_classes, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, num_layers=layers, batch_first=True)
        self.output = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Ids arrive as uint8 (a quarter of the memory of int64 for millions of windows).
        steps, _ = self.lstm(self.embedding(x.long()))
        return self.output(steps[:, -1])


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# A dense model this small does ~1 M multiply-adds per example: a batch's matrix products are
# too short for a second thread to pay for its synchronisation, which costs most when other
# processes share the cores (a simulation's engine and Ray). Measured in a 20-client 2NN
# simulation: 1 thread trains a client in 14 ms, 2 threads in 20 ms.
SMALL_DENSE_PARAMETERS = 1_000_000


def is_small_dense(model: nn.Module) -> bool:
    """Only Linear layers carry parameters, and fewer than SMALL_DENSE_PARAMETERS of them (for
    dense layers, the parameters are the multiply-adds per example)."""
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return all(isinstance(m, nn.Linear) for m in layers) and \
        num_parameters(model) < SMALL_DENSE_PARAMETERS


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The state_dict as named ndarrays (copies: the model may keep training)."""
    # From a GPU, .cpu() is the copy; a CPU tensor's .cpu() is the tensor itself.
    return {k: v.detach().cpu().numpy() if v.device.type != "cpu" else v.detach().numpy().copy()
            for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load named ndarrays; wrong names or shapes raise ValueError naming the first mismatch."""
    state = model.state_dict()
    if set(weights) != set(state):
        missing, extra = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
        raise ValueError(
            f"Model arrays do not match {type(model).__name__}: missing {missing}, "
            f"unexpected {extra}. Server and clients must use the same model config."
        )
    for name, value in weights.items():
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(
                f"Array '{name}' has shape {tuple(value.shape)}, but {type(model).__name__} "
                f"expects {tuple(state[name].shape)}. Server and clients must use the same "
                "model and dataset config."
            )
    # Copied straight into the tensors' memory: load_state_dict costs ~1 ms of Python per call
    # (a simulated client loads the model for every message), and the arrays may be read-only
    # views of a Flower message, which torch.from_numpy warns about.
    for name, value in weights.items():
        tensor = state[name]
        if tensor.device.type == "cpu":
            np.copyto(tensor.numpy(), value, casting="same_kind")
        else:  # one host-to-device copy, straight from the (possibly read-only) array
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                tensor.copy_(torch.from_numpy(np.asarray(value)))
