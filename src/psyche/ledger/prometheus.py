"""``GET /metrics``: the server's runs in Prometheus text format (via prometheus_client)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from psyche.coordinator import queries as q

if TYPE_CHECKING:
    from psyche.ledger.host import RunHost


class _RunsCollector:
    """Reads the live coordinator states at scrape time; keeps no state of its own."""

    def __init__(self, hosts: Mapping[str, RunHost], rejected: Mapping[str, int]):
        self.hosts = hosts
        self.rejected = rejected

    def collect(self) -> Iterator[Metric]:
        step = GaugeMetricFamily("psyche_run_step", "Optimizer steps the run has completed (0 before training, "
                                 "total_steps once finished)", labels=["run_id"])
        epoch = GaugeMetricFamily("psyche_run_epoch", "Current epoch of the run", labels=["run_id"])
        state = GaugeMetricFamily("psyche_run_state", "1 for the run's current state", labels=["run_id", "state"])
        clients = GaugeMetricFamily("psyche_run_clients", "Clients of the run by health", labels=["run_id", "health"])
        seq = CounterMetricFamily("psyche_run_instructions", "Instructions applied to the run", labels=["run_id"])
        refused = CounterMetricFamily("psyche_run_refused", "Instructions the coordinator refused", labels=["run_id", "error"])
        for run_id, host in self.hosts.items():
            s = host.coordinator.state
            step.add_metric([run_id], q.steps_completed(s))
            epoch.add_metric([run_id], s.epoch)
            state.add_metric([run_id, str(s.run_state.value)], 1)
            counts: dict[str, int] = {}
            for c in s.clients:
                counts[str(c.state.value)] = counts.get(str(c.state.value), 0) + 1
            for health, n in counts.items():
                clients.add_metric([run_id, health], n)
            seq.add_metric([run_id], host.seq)
            for error, n in host.refused.items():
                refused.add_metric([run_id, error], n)
        rejected = CounterMetricFamily("psyche_requests_rejected", "Requests rejected before reaching a coordinator", labels=["reason"])
        for reason, n in self.rejected.items():
            rejected.add_metric([reason], n)
        yield from (step, epoch, state, clients, seq, refused, rejected)


def render_metrics(hosts: Mapping[str, RunHost], rejected: Mapping[str, int]) -> tuple[bytes, str]:
    """The Prometheus exposition of the runs ``hosts`` (by run id) and of the requests
    ``rejected`` before reaching them (by reason), and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RunsCollector(hosts, rejected))
    return generate_latest(registry), CONTENT_TYPE_LATEST
