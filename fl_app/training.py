"""Local training, gradient and evaluation loops: pure PyTorch, no Flower.

Data arrive as in-memory tensors, so batches are index slices of a seeded permutation rather
than a DataLoader: the same order for the same seed, and no worker start-up per round.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def setup_torch(num_threads: int | None = None) -> None:
    """CPU settings for every training entry point.

    Late in training small models produce denormal floats, which slowed a CNN round on this
    CPU from ~4 s to ~30 s; flushing them to zero costs nothing in accuracy.
    """
    torch.set_flush_denormal(True)
    if num_threads:
        torch.set_num_threads(num_threads)


def steps_per_epoch(n: int, batch_size: int | None) -> int:
    """The optimizer steps one local epoch over `n` examples takes (the batches of `train`)."""
    return -(-n // batch_size) if batch_size else 1


def _batches(n: int, batch_size: int | None, generator: torch.Generator,
             device: torch.device | None = None):
    # The order is drawn on the CPU: the same batches for the same seed on every device.
    order = torch.randperm(n, generator=generator).to(device)
    step = n if not batch_size else batch_size
    for start in range(0, n, step):
        yield order[start:start + step]


def add_proximal_gradient(params: list[torch.Tensor], anchor: list[torch.Tensor],
                          mu: float) -> None:
    """Add the gradient of FedProx's proximal term mu/2·||w − w_global||² (Li et al. 2020),
    mu·(w − w_global), to every parameter's .grad, in place.

    The term pulls local training back towards the global model the client received
    (`anchor`), which limits client drift on heterogeneous data. Adding its gradient directly
    gives the same SGD step as adding the term to the loss, and is cheaper: +10% per step on
    the 2NN, against +65% through autograd.
    """
    with torch.no_grad():
        for p, a in zip(params, anchor, strict=True):
            if p.grad is None:  # a parameter the loss did not touch still feels the pull
                p.grad = mu * (p - a)
            else:
                p.grad.add_(p, alpha=mu).sub_(a, alpha=mu)


def check_proximal_mu(mu: float, lr: float) -> float:
    """mu as a float, refused if negative or so large that local SGD diverges.

    Near the anchor the proximal term alone makes each SGD step scale w − w_global by
    (1 − lr·mu): for lr·mu >= 2 that factor is <= −1 and training blows up.
    """
    mu = float(mu)
    if not math.isfinite(mu) or mu < 0:
        raise ValueError(f"proximal-mu must be a finite number >= 0, got {mu!r} "
                         "(strategy.proximal_mu; 0 is plain FedAvg).")
    if mu * lr >= 2:
        raise ValueError(
            f"proximal-mu = {mu:g} with lr = {lr:g}: lr·mu = {mu * lr:g} >= 2, so local SGD "
            f"on the proximal term diverges. Use strategy.proximal_mu < {2 / lr:g} (values "
            "of 0.001 to 1 are typical) or a smaller lr.")
    return mu


@torch.no_grad()
def sgd_step(params: list[torch.Tensor], lr: float) -> None:
    """w ← w − lr·∇w for every parameter that has a gradient.

    torch.optim.SGD does the same, but building the first one in a process imports
    torch._dynamo (1.7 s here, inside every client's first round), and its step costs more
    per call than the update itself on small models.
    """
    live = [p for p in params if p.grad is not None]
    if live:
        torch._foreach_add_(live, [p.grad for p in live], alpha=-lr)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int | None,
          lr: float, seed: int, proximal_mu: float = 0.0) -> float:
    """SGD for `epochs` passes over (x, y); returns the mean training loss of the last epoch.

    With `proximal_mu` > 0 (FedProx) each step descends loss + mu/2·||w − w_start||², w_start
    being the weights the model had on entry (the global model); the reported loss is the data
    loss alone. mu = 0 runs exactly plain SGD: no copy of the weights, no extra work.
    """
    mu = check_proximal_mu(proximal_mu, lr)
    model.train()
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params] if mu else []
    generator = torch.Generator().manual_seed(seed)
    # A GPU's losses are summed on the GPU: reading each one would wait for every step. On the
    # CPU .item() costs less than the tensor arithmetic.
    on_cpu = x.device.type == "cpu"
    total, count = 0.0, 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in _batches(len(y), batch_size, generator, x.device):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if mu:
                add_proximal_gradient(params, anchor, mu)
            sgd_step(params, lr)
            total += loss.item() * len(idx) if on_cpu else loss.detach() * len(idx)
            count += len(idx)
    return float(total) / max(count, 1)


def train_dpsgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
                batch_size: int | None, lr: float, noise_multiplier: float, max_grad_norm: float,
                accountant_history: list[tuple[float, float, int]], proximal_mu: float = 0.0,
                ) -> tuple[float, list[tuple[float, float, int]]]:
    """Example-level DP-SGD (Abadi et al. 2016) with Opacus for `epochs` passes over (x, y).

    Batches are Poisson-sampled with rate q = batch_size / n; each example's gradient is
    clipped to `max_grad_norm` and N(0, (noise_multiplier * max_grad_norm)^2) noise is added to
    their sum. Sampling and noise draw from OS entropy: a seed known to the server would let
    it subtract the noise. Opacus' RDP accountant continues from `accountant_history` (the
    client's previous rounds); returns the mean loss of the last epoch and the new history.
    The model is hooked in place, not wrapped, so its state_dict keys stay the plain ones.

    `proximal_mu` > 0 (FedProx) adds mu·(w − w_start) to each noisy gradient, as SGD on
    loss + mu/2·||w − w_start||² would. Opacus replaces p.grad by the clipped, noised sum of
    per-example gradients, which would drop a term added to the loss; the proximal gradient
    depends on no example (only on w, itself already private, and the public global model),
    so it is added after the noise and costs no privacy.
    """
    mu = check_proximal_mu(proximal_mu, lr)
    from opacus import PrivacyEngine  # imports in ~2 s: only clients that use DP-SGD pay it

    device = next(model.parameters()).device

    def os_entropy_generator(on: torch.device | str = "cpu") -> torch.Generator:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator(device=on).manual_seed(seed)

    loader = DataLoader(TensorDataset(x, y), batch_size=min(batch_size or len(y), len(y)),
                        generator=os_entropy_generator())
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: that mode needs torchcsprng; the generators
        # above are seeded from OS entropy instead, so the noise cannot be regenerated.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(accountant_history)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if mu else []
    hooks, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
        # Opacus draws the noise where the gradients are, with this generator: same device.
        noise_generator=os_entropy_generator(device), wrap_model=False)
    total, count = 0.0, 0
    # Empty Poisson batches are expected with small local sets; Opacus logs each one.
    data_loader_log = logging.getLogger("opacus.data_loader")
    previous_level = data_loader_log.level
    data_loader_log.setLevel(logging.ERROR)
    try:
        for _ in range(epochs):
            total, count = 0.0, 0
            for xb, yb in loader:
                # An empty Poisson batch is made on the CPU by Opacus, whatever the data's device.
                xb, yb = xb.to(device), yb.to(device)
                optimizer.zero_grad(set_to_none=True)
                # An empty Poisson batch still takes a (pure noise) step: the accountant
                # counts every step, so skipping one would overstate the noise.
                loss = F.cross_entropy(model(xb), yb, reduction="sum") / max(len(yb), 1)
                with warnings.catch_warnings():  # inputs need no gradient: Opacus' hooks are fine
                    warnings.filterwarnings("ignore", message="Full backward hook")
                    loss.backward()
                if mu:  # the proximal gradient at the pre-step weights
                    pull = [mu * (p.detach() - a) for p, a in zip(params, anchor, strict=True)]
                optimizer.step()
                if mu:
                    with torch.no_grad():
                        for p, g in zip(params, pull, strict=True):
                            p.sub_(lr * g)
                total += loss.item() * len(yb)
                count += len(yb)
    finally:
        data_loader_log.setLevel(previous_level)
        hooks.cleanup()  # removes the hooks and the per-example gradients from the parameters
    return total / max(count, 1), list(engine.accountant.history)


# A full-batch gradient over a large local set is accumulated over chunks of this many
# examples: the character LSTM keeps 80 steps of activations per example, and a role with
# 20,000 windows would otherwise need about 20 GB for one backward pass.
GRADIENT_CHUNK = 2048


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None,
             seed: int) -> tuple[dict[str, torch.Tensor], float, int]:
    """∇W of the mean loss over the local set (batch_size None) or one seeded batch of it.

    Returns the gradient keyed like the state_dict (zeros for buffers), the loss, and the
    number of examples it was computed on.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    if batch_size and batch_size < len(y):
        idx = next(_batches(len(y), batch_size, torch.Generator().manual_seed(seed), x.device))
        x, y = x[idx], y[idx]
    if len(y) <= GRADIENT_CHUNK:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        loss_value = loss.item()
    else:  # the same mean gradient, accumulated chunk by chunk
        loss_value = 0.0
        for start in range(0, len(y), GRADIENT_CHUNK):
            part = F.cross_entropy(model(x[start:start + GRADIENT_CHUNK]),
                                   y[start:start + GRADIENT_CHUNK], reduction="sum") / len(y)
            part.backward()
            loss_value += part.item()
    params = dict(model.named_parameters())
    grads = {name: (params[name].grad.detach().clone() if name in params
                    else torch.zeros_like(value))
             for name, value in model.state_dict().items()}
    return grads, loss_value, len(y)


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
