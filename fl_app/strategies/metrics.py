"""The clients' scalar metrics of a round, averaged: example-weighted means kept as running sums,
so no list of replies is held, and the largest client-side epsilon seen so far."""

import math
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message, MetricRecord
from flwr.common.logger import log

NUM_EXAMPLES = "num-examples"

# Client-side privacy: each client reports its own epsilon, which only grows. A mean over the
# round's clients hides the worst one, so the largest value seen so far is recorded as <key>_max.
CLIENT_EPSILONS = ("local_epsilon", "dpsgd_epsilon")


def positive_count(value: object) -> bool:
    """Whether `value` can be a reply's num-examples: a finite number > 0 (no bool, no list)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


class MetricAverager:
    """Example-weighted running mean of the clients' scalar metrics (no list of replies kept).

    `running_max`, when given, is a dict that outlives the round: the largest value of each
    `CLIENT_EPSILONS` metric seen so far is kept in it and reported as `<key>_max`.
    """

    def __init__(self, running_max: dict[str, float] | None = None) -> None:
        self.running_max = running_max
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.num_clients = 0
        self.num_examples = 0.0

    def add(self, num_examples: float, metrics: MetricRecord) -> None:
        """Fold one client's scalar metrics in, weighted by its number of examples."""
        self.num_clients += 1
        self.num_examples += num_examples
        for key, value in metrics.items():
            if key == NUM_EXAMPLES or isinstance(value, (bool, list)):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + num_examples * float(value)
            self.weights[key] = self.weights.get(key, 0.0) + num_examples
            if self.running_max is not None and key in CLIENT_EPSILONS:
                self.running_max[key] = max(self.running_max.get(key, 0.0), float(value))

    def record(self) -> MetricRecord:
        """The averages so far, plus the total num-examples and the num-clients seen."""
        averages = {key: self.sums[key] / self.weights[key] for key in self.sums}
        averages |= {f"{key}_max": value for key, value in (self.running_max or {}).items()}
        total = self.num_examples
        num_examples = int(total) if total.is_integer() else total
        return MetricRecord(
            {**averages, NUM_EXAMPLES: num_examples, "num-clients": self.num_clients}
        )


def average_evaluation(server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
    """Example-weighted mean of the clients' evaluation metrics; None if none is usable.

    An error reply, or one without a positive num-examples, is logged and left out."""
    averager = MetricAverager()
    for msg in replies:
        node_id = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "Round %s: evaluation error from node %s: %s",
                server_round, node_id, msg.error.reason)
            continue
        metrics = msg.content.get("metrics") if msg.has_content() else None
        num_examples = metrics.get(NUM_EXAMPLES) if isinstance(metrics, MetricRecord) else None
        if not positive_count(num_examples):
            log(WARNING, "Round %s: dropping evaluation reply from node %s: no positive '%s'",
                server_round, node_id, NUM_EXAMPLES)
            continue
        averager.add(float(num_examples), metrics)
    return averager.record() if averager.num_clients else None
