"""fl_app's server strategies (Flower Message API, numpy only), one file each: FedAvg (fedavg.py),
FedSGD (fedsgd.py), FedNova (fednova.py); what they share in base.py, sampling.py, replies.py and
aggregation.py; what any strategy supports, Flower's included, in features.py; Flower's own
strategies' replies and state in flower_adapter.py.
Central DP wraps them: fl_app.privacy.central."""

from fl_app.strategies.base import SampledStrategy
from fl_app.strategies.fedavg import WeightedFedAvg
from fl_app.strategies.fednova import FedNova
from fl_app.strategies.fedsgd import GradientAveraging
from fl_app.strategies.sampling import NotEnoughClientsError

__all__ = [
    "FedNova", "GradientAveraging", "NotEnoughClientsError", "SampledStrategy", "WeightedFedAvg",
]
