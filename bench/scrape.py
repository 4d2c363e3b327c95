"""A gateway's /metrics as the bench phases read it, parsed by prometheus-client's own parser."""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


def totals(metrics_url: str) -> defaultdict[str, float]:
    """Every sample's value summed over its labels, by sample name
    ("gateway_requests_total": all requests answered); a name not exported reads 0."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    sums: defaultdict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] += sample.value
    return sums
