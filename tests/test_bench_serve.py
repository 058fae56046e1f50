"""`clora bench serve` runs its fixed counts against a real server and counts what it did."""

from __future__ import annotations

import pytest

pytest.importorskip("tinker")
pytest.importorskip("openai")

from clora.bench.serve_load import _percentile, run_load  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # starts its own server: ~1 min on a loaded machine


def test_a_small_load_check_serves_every_request():
    out = run_load(tinker_clients=1, chat_clients=2, rounds=2, max_seconds=300)
    assert out["errors"] == [] and out["http_errors"] == 0
    assert len(out["latencies"]["tinker_step"]) == 2 and len(out["latencies"]["chat"]) == 4
    assert out["http_requests"] > 2 * 4 + 4  # each Tinker step is several requests (futures included)


def test_percentile_picks_from_the_sorted_values():
    assert _percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert _percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
