"""Fixtures for the deployment checks (compose, Grafana, Kubernetes): what the server really exports."""

from __future__ import annotations

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics


def exported_samples() -> dict[str, frozenset[str]]:
    """Every sample name ``/metrics`` renders, mapped to its label names.

    Built from a real :class:`server.metrics.Metrics`: every labelled metric gets one child (prometheus-client
    renders a labelled metric's samples only once a child exists), then the exposition text is rendered and parsed
    back with prometheus-client's own parser, so counters come out as ``_total`` / ``_created`` and histograms as
    ``_bucket`` / ``_sum`` / ``_count`` / ``_created`` exactly as a scraper sees them.
    """
    metrics = Metrics()
    for metric in vars(metrics).values():
        # _labelnames: prometheus-client keeps no public accessor for a metric's label names
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}


@pytest.fixture(scope="session")
def exported() -> dict[str, frozenset[str]]:
    """Sample names the server exports, with their label names (see :func:`exported_samples`)."""
    return exported_samples()

