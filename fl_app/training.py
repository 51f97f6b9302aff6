"""Local training, gradient and evaluation loops: pure PyTorch, no Flower.

Data arrive as in-memory tensors, so batches are index slices of a seeded permutation rather
than a DataLoader: the same order for the same seed, and no worker start-up per round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def setup_torch(num_threads: int | None = None) -> None:
    """CPU settings for every training entry point.

    Late in training small models produce denormal floats, which slowed a CNN round on this
    CPU from ~4 s to ~30 s; flushing them to zero costs nothing in accuracy.
    """
    torch.set_flush_denormal(True)
    if num_threads:
        torch.set_num_threads(num_threads)


def _batches(n: int, batch_size: int | None, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    step = n if not batch_size else batch_size
    for start in range(0, n, step):
        yield order[start:start + step]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int | None,
          lr: float, seed: int) -> float:
    """SGD for `epochs` passes over (x, y); returns the mean training loss of the last epoch."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in _batches(len(y), batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
    return total / max(count, 1)


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None,
             seed: int) -> tuple[dict[str, torch.Tensor], float, int]:
    """∇W of the mean loss over the local set (batch_size None) or one seeded batch of it.

    Returns the gradient keyed like the state_dict (zeros for buffers), the loss, and the
    number of examples it was computed on.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    if batch_size and batch_size < len(y):
        idx = next(_batches(len(y), batch_size, torch.Generator().manual_seed(seed)))
        x, y = x[idx], y[idx]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = dict(model.named_parameters())
    grads = {name: (params[name].grad.detach().clone() if name in params
                    else torch.zeros_like(value))
             for name, value in model.state_dict().items()}
    return grads, loss.item(), len(y)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of the model on (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    n = max(len(y), 1)
    return loss / n, correct / n
