"""Epsilon by both accountants (RDP and PLD) on docs/privacy.md's settings, without training.

The rows are those of `scripts/dp_utility.py` (composed from its ROWS, on its 500-client
population, q = 0.1, 50 rounds) and the hospitals preset with central DP. Client-side rows are
accounted for the busiest client: `--releases` rounds (15 in the docs' run: the most any of the
500 clients was drawn in 50 rounds at q = 0.1), and for DP-SGD 10 local steps a round.

    python scripts/epsilon_table.py     # docs/privacy.md's "Accounting, precisely" table
"""

from __future__ import annotations

import argparse
import math

from omegaconf import DictConfig

from fl_app.config import compose
from fl_app.data import load_dataset
from fl_app.privacy.accounting import Epsilon, epsilons
from fl_app.privacy.client import DPSGD

try:  # run as `python scripts/epsilon_table.py`: scripts/ is on the path
    from dp_utility import COMMON, ROWS
except ImportError:  # imported as scripts.epsilon_table
    from scripts.dp_utility import COMMON, ROWS


def central(cfg: DictConfig) -> tuple[str, Epsilon]:
    """(settings, epsilons) of a central-DP run: the combined multiplier over its rounds."""
    s = cfg.strategy
    delta = s.delta if s.delta is not None else 1 / (10 * cfg.num_clients)
    q = cfg.fraction_train
    return (f"σ = {s.noise_multiplier:g}, q = {q:g}, {cfg.num_rounds} rounds, δ = {delta:.1g}",
            epsilons(s.noise_multiplier, q, cfg.num_rounds, delta))


def client_side(cfg: DictConfig, releases: int) -> tuple[str, Epsilon]:
    """(settings, epsilons) of the busiest client of a local-DP or DP-SGD run."""
    p = cfg.privacy
    if p.name == "local":  # sensitivity 2C: multiplier sigma / 2, no sampling
        return (f"σ/2 = {p.noise_multiplier / 2:g}, {releases} releases, δ = {p.delta:.0e}",
                epsilons(p.noise_multiplier / 2, 1.0, releases, p.delta))
    examples = len(load_dataset(cfg.dataset).y_train) // cfg.num_clients
    q = cfg.batch_size / examples
    steps = releases * cfg.local_epochs * math.ceil(examples / cfg.batch_size)
    dpsgd = DPSGD(p.max_grad_norm, p.noise_multiplier, p.delta)
    dpsgd.history = [(p.noise_multiplier, q, steps)]
    both = dpsgd.epsilons()
    return (f"σ = {p.noise_multiplier:g}, q = {q:g}, {steps} steps, δ = {p.delta:.0e}", both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--releases", type=int, default=15,
                        help="rounds the busiest client took part in (client-side DP rows)")
    args = parser.parse_args()
    population = [f"num_rounds={args.rounds}", f"num_clients={args.clients}",
                  f"fraction_train={args.fraction}"]
    rows = [(label, compose([*COMMON, *overrides, *population]))
            for label, overrides in ROWS.values() if overrides != ["strategy=fedavg"]]
    rows.append(("hospitals preset, central DP-FedAvg",
                 compose(["+experiment=hospitals", "strategy=dp_fedavg"])))
    print("| run | accounted | ε RDP | ε PLD | PLD / RDP |")
    print("|---|---|---|---|---|")
    for label, cfg in rows:
        settings, both = (central(cfg) if "noise_multiplier" in cfg.strategy
                          else client_side(cfg, args.releases))
        print(f"| {label} | {settings} | {both.rdp:.4g} | {both.pld:.4g} | "
              f"{both.pld / both.rdp:.2f} |")


if __name__ == "__main__":
    main()
