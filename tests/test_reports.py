"""The figures a client reports about its training (`hlora.federation.reports`): checked before they
enter the metrics, in the simulation as on Flower (tests/test_flower_strategy.py), and a figure that
fails is recorded as missing and counted, never averaged in."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from hlora import simulation
from hlora.client.client import FederatedClient
from hlora.config import validate_settings
from hlora.federation.metrics import round_line
from hlora.federation.prepared import prepare
from hlora.federation.reports import MAX_BYTES, PlannedWork, check_reports, report_problems
from hlora.protocol import TrainResult
from hlora.rundir import create_run_dir, read_metrics

PLAN = PlannedWork(num_samples=16, steps=2, batch_size=8)


def honest() -> TrainResult:
    return TrainResult(None, 16, 2, 16, 0.69, 0.5, 0.1, 123_456, state_bytes=7_890)


def test_an_honest_report_passes():
    assert report_problems(honest(), PLAN) == []


@pytest.mark.parametrize(
    ("figure", "value"),
    [
        ("mean_loss", math.nan),
        ("mean_loss", math.inf),
        ("mean_loss", -0.5),
        ("mean_loss", 1e300),
        ("mean_loss", "0.5"),
        ("wall_s", math.nan),
        ("wall_s", 1e9),
        ("step_s", -1.0),
        ("peak_bytes", 2**62),
        ("peak_bytes", -1),
        ("peak_bytes", 1234.0),  # a count that is not an int
        ("state_bytes", True),
        ("steps", 0),
        ("steps", 10**9),
        ("samples_seen", 10**9),
        ("num_samples", 10**6),  # a client does not decide its own size: the server partitioned the rows
        ("num_samples", 1e300),
    ],
)
def test_a_figure_that_is_not_a_sane_number_is_named(figure, value):
    assert report_problems(replace(honest(), **{figure: value}), PLAN) == [figure]


def test_failed_figures_are_set_to_none_and_the_rest_kept():
    bad = replace(honest(), mean_loss=math.nan, peak_bytes=2**62)
    checked, invalid = check_reports({0: honest(), 3: bad}, {0: PLAN, 3: PLAN})
    assert invalid == {3: ["mean_loss", "peak_bytes"]}
    assert checked[0] == honest()
    assert checked[3].mean_loss is None and checked[3].peak_bytes is None
    assert checked[3].step_s == bad.step_s and checked[3].weights is bad.weights


def lying_client(monkeypatch, client_id: int, **figures) -> None:
    """Client `client_id` of the simulation reports `figures` instead of its own."""
    real = FederatedClient.fit

    def fit(self, plan, seed):
        update, result = real(self, plan, seed)
        return update, replace(result, **figures) if self.client_id == client_id else result

    monkeypatch.setattr(FederatedClient, "fit", fit)


def test_a_nan_loss_and_a_huge_peak_from_a_client_never_reach_the_simulations_metrics(
    tiny_settings, tmp_path, monkeypatch, caplog
):
    raw = tiny_settings.model_dump()
    raw["lora"].update(rank_policy="tiers", tiers=[1, 2, 4])
    raw["federation"]["method"] = "hlora"
    settings = validate_settings(raw)
    lying_client(monkeypatch, 1, mean_loss=math.nan, peak_bytes=2**62)
    out = tmp_path / "run"
    summary = simulation.run(prepare(settings), create_run_dir(out), progress=False)
    rows = read_metrics(out)
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    assert "NaN" not in text and str(2**62) not in text
    for row in rows:
        assert row["invalid_reports"] == {"1": ["mean_loss", "peak_bytes"]}
        assert math.isfinite(row["train_loss"])
        assert all(v < MAX_BYTES for v in row["tier_peak_bytes"].values())
        assert row["aggregated_clients"] == [0, 1, 2]  # the update itself is judged on its own
    assert summary["invalid_reports_by_field"] == {"mean_loss": 2, "peak_bytes": 2}
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary
    assert "client 1" in caplog.text and "mean_loss" in caplog.text


def test_a_run_with_honest_clients_records_no_invalid_report(tiny_settings, tmp_path):
    out = tmp_path / "run"
    summary = simulation.run(prepare(tiny_settings), create_run_dir(out), progress=False)
    assert [row["invalid_reports"] for row in read_metrics(out)] == [{}, {}]
    assert summary["invalid_reports_by_field"] == {}


def test_the_round_line_names_the_clients_whose_figures_were_left_out():
    row = {"round": 1, "accuracy": 0.5, "train_loss": 0.7, "uplink_bytes": 0, "downlink_bytes": 0,
           "wall_s": 1.0, "invalid_reports": {"1": ["mean_loss", "peak_bytes"]}}
    assert round_line(row, 2).endswith("  bad figures c1 mean_loss,peak_bytes")
    assert "bad figures" not in round_line({**row, "invalid_reports": {}}, 2)
