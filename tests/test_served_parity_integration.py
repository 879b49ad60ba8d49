"""The served path equals the offline model: a trend + item-ID model trained before a global time cut,
run by a real worker on real Kafka and Redis over the pre-cut events, stores the vectors the offline
model computes for the same histories, and the figure scored from Redis is the offline figure."""

from __future__ import annotations

import pytest

from streams.through_stream import run_through_stream

pytestmark = pytest.mark.integration


def test_stream_vectors_equal_the_offline_model(pipeline_settings, tmp_path):
    report = run_through_stream(
        pipeline_settings,
        dataset="sim",
        model="hybrid",
        out=tmp_path / "thru",
        steps=10,
        parity_users=60,
        progress=False,
    )
    assert report["users"] > 100 and report["events"] > 10_000
    assert report["user_cosine_min"] >= 0.999, report
    assert report["item_cosine_min"] >= 0.999, report
    assert report["trend_max_abs_error"] <= 1e-4, report  # the agents' counts == the dataset's, at the cut
    assert abs(report["delta_recall@50"]) <= 0.005, report
