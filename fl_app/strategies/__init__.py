"""Server strategies (Flower Message API, numpy only): FedAvg, FedSGD and central DP around them."""

from fl_app.strategies.base import NotEnoughClientsError, SampledStrategy
from fl_app.strategies.dp import DPNoise, PrivacyBudgetExhausted
from fl_app.strategies.fedavg import WeightedFedAvg
from fl_app.strategies.fedsgd import GradientAveraging

__all__ = [
    "DPNoise",
    "GradientAveraging",
    "NotEnoughClientsError",
    "PrivacyBudgetExhausted",
    "SampledStrategy",
    "WeightedFedAvg",
]
