"""`eval.every`: the global adapter (and the tiers) scored every N rounds and in the last; the rounds
between have no scores, the global adapter is the same bit for bit, and every reader of the rows copes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hlora import simulation
from hlora.config import load_settings, validate_settings
from hlora.errors import ConfigError
from hlora.experiments import report
from hlora.federation.metrics import plot_accuracy, round_line, summarise
from hlora.federation.prepared import prepare
from hlora.rundir import create_run_dir, read_metrics
from tests.test_checkpoint import assert_same_state

SCORES = ("accuracy", "f1", "tier_accuracy", "tier_f1", "eval_s", "tier_eval_s", "prediction_spread")


def with_eval(settings, method: str = "hlora", rounds: int = 3, **eval_):
    """`settings` at `method` with mixed ranks 2/4, `rounds` rounds and the `[eval]` keys given."""
    raw = settings.model_dump()
    raw["federation"].update(method=method, clients_per_round=2, rounds=rounds)
    raw["lora"].update(rank_policy="tiers", tiers=[2, 4])
    raw["eval"].update(eval_)
    return validate_settings(raw)


def play(settings, run_dir: Path):
    exp = prepare(settings)
    simulation.run(exp, create_run_dir(run_dir), progress=False)
    return exp, read_metrics(run_dir)


# --- config -------------------------------------------------------------------------------------------


def test_every_is_one_by_default_and_zero_is_refused_in_one_line():
    assert load_settings(None, []).eval.every == 1
    assert load_settings(None, ["eval.every=5"]).eval.every == 5
    for bad in ("0", "-2", "1.5"):
        with pytest.raises(ConfigError, match="eval.every") as info:
            load_settings(None, [f"eval.every={bad}"])
        assert "\n" not in str(info.value)


# --- the round loop -----------------------------------------------------------------------------------


def test_scores_come_every_n_rounds_and_in_the_last(tiny_settings, tmp_path):
    _, rows = play(with_eval(tiny_settings, rounds=5, every=2, tiers=True), tmp_path / "run")
    assert [r["evaluated"] for r in rows] == [False, True, False, True, True]
    for row in rows:
        present = {key for key in SCORES if key in row}
        assert present == (set(SCORES) if row["evaluated"] else set()), row["round"]
        assert {"train_loss", "uplink_bytes", "wall_s", "aggregated_clients"} <= row.keys()
        if row["evaluated"]:  # the global model's answers: a share per class, and the logits' spread
            spread = row["prediction_spread"]
            assert sum(spread["predicted_share"].values()) == pytest.approx(1.0) and spread["logit_std"] >= 0
            assert len(spread["feature_variation"]) == 3  # embeddings and the tiny BERT's 2 layers
            assert all(0 < v <= 1 for v in spread["feature_variation"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["rounds"] == 5 and (tmp_path / "run" / "accuracy.png").is_file()


def test_a_round_records_the_cpu_it_spent_apart_from_the_time_it_waited(tiny_settings, tmp_path, monkeypatch):
    exp = prepare(with_eval(tiny_settings, rounds=2, every=2))
    aggregate = type(exp.server).aggregate

    def waiting(server, rnd, updates):  # a round held up for 0.4 s: cores held elsewhere, or a pause
        time.sleep(0.4)
        return aggregate(server, rnd, updates)

    monkeypatch.setattr(type(exp.server), "aggregate", waiting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one busy thread: the CPU time is at most the wall time it did not wait
    try:
        simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    finally:
        torch.set_num_threads(threads)
    for row in read_metrics(tmp_path / "run"):
        assert row["cpu_s"] > 0 and row["wall_s"] >= 0.4
        assert row["cpu_s"] <= row["wall_s"] - 0.3, row  # the wall time would count the wait


def test_final_tiers_stay_on_the_last_round_and_every_one_scores_every_round(tiny_settings, tmp_path):
    _, rows = play(with_eval(tiny_settings, rounds=3, every=2, tiers="final"), tmp_path / "final")
    assert [r["evaluated"] for r in rows] == [False, True, True]
    assert ["tier_accuracy" in r for r in rows] == [False, False, True]
    _, rows = play(with_eval(tiny_settings, rounds=2), tmp_path / "every")
    assert all(r["evaluated"] and "accuracy" in r and "tier_accuracy" in r for r in rows)


@pytest.mark.parametrize("method", ["hlora", "flora"])
def test_skipping_evaluation_leaves_the_global_adapter_bit_identical(tiny_settings, tmp_path, method):
    runs = {
        every: play(with_eval(tiny_settings, method, rounds=3, every=every), tmp_path / f"every{every}")
        for every in (1, 3)
    }
    (exp1, rows1), (exp3, rows3) = runs[1], runs[3]
    assert [r["evaluated"] for r in rows3] == [False, False, True]
    assert [r["train_loss"] for r in rows3] == [r["train_loss"] for r in rows1]
    assert [r["client_update_norm"] for r in rows3] == [r["client_update_norm"] for r in rows1]
    assert rows3[-1]["accuracy"] == rows1[-1]["accuracy"]
    assert_same_state(exp3.server.state_dict(), exp1.server.state_dict())
    assert_same_state(exp3.server.global_weights.tensors(), exp1.server.global_weights.tensors())
    base1 = dict(exp1.model.module.named_parameters())
    for name, p in exp3.model.module.named_parameters():
        if "base_layer" in name:  # FLoRA's merged deltas: the same base, whenever it was merged
            assert torch.equal(p, base1[name]), name


# --- readers of the rows ------------------------------------------------------------------------------


def gap_rows(accuracies: dict[int, float], rounds: int, bytes_per_round: int = 10) -> list[dict]:
    """Rows of rounds 1..`rounds`, scored (`accuracies[round]`) on the rounds given and not on the rest."""
    rows = []
    for rnd in range(1, rounds + 1):
        row = {"round": rnd, "evaluated": rnd in accuracies}
        if rnd in accuracies:
            row.update(accuracy=accuracies[rnd], f1=accuracies[rnd] / 2, tier_accuracy={"2": 0.5, "4": 0.6})
        row.update(
            train_loss=0.5, uplink_bytes=bytes_per_round, downlink_bytes=bytes_per_round, wall_s=1.0,
            aggregate_s=0.1, tier_step_s={"2": 0.1, "4": 0.2}, round_failed=False, rejected={},
            failed_clients={}, corrupted_clients={},
        )  # fmt: skip
        rows.append(row)
    return rows


def test_summarise_reads_the_evaluated_rounds():
    rows = gap_rows({2: 0.7, 4: 0.9, 5: 0.8}, 5)
    summary = summarise(rows, {"task": "mrpc"})
    assert summary["final_accuracy"] == 0.8 and summary["final_f1"] == 0.4
    assert summary["best_accuracy"] == 0.9 and summary["best_round"] == 4 and summary["best_f1"] == 0.45
    assert summary["final_tier_accuracy"] == {"2": 0.5, "4": 0.6}
    assert summary["rounds"] == 5 and summary["total_uplink_bytes"] == 50 and summary["failed_rounds"] == 0


def test_round_line_of_a_round_without_scores():
    row = gap_rows({2: 0.7}, 2)[0]
    row.update(clients=[0, 1])
    line = round_line(row, 2)
    assert "acc -" in line and "\n" not in line and "loss 0.5000" in line


def test_round_line_names_a_model_that_gives_every_row_one_class():
    row = gap_rows({2: 0.6838}, 2)[1]
    row["prediction_spread"] = {"predicted_share": {"0": 0.3, "1": 0.7}, "logit_std": 0.8}
    assert "one class" not in round_line(row, 2)
    row["prediction_spread"] = {"predicted_share": {"0": 0.0, "1": 1.0}, "logit_std": 0.02}
    assert round_line(row, 2).endswith("every dev row one class")
    row["prediction_spread"]["logit_std"] = 0.0
    assert round_line(row, 2).endswith("every dev row one class (the same logits: blind to the input)")
    row["prediction_spread"]["feature_variation"] = [0.5, 0.02, 4e-07]
    assert round_line(row, 2).endswith("(the same logits: blind to the input)  last layer's features flat "
                                       "(vary 4.0e-07)")  # fmt: skip
    row["prediction_spread"]["feature_variation"] = [0.5, 0.02, 0.3]
    assert "flat" not in round_line(row, 2)


def test_plot_draws_the_evaluated_rounds(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, **kwargs):
        drawn.append((list(x), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    plot_accuracy(gap_rows({2: 0.7, 4: 0.9, 5: 0.8}, 5), tmp_path / "a.png", "t", baseline=0.6)
    assert (tmp_path / "a.png").is_file()
    assert drawn[0] == ([2, 4, 5], [0.7, 0.9, 0.8])  # accuracy
    assert drawn[1] == ([2, 4, 5], [0.35, 0.45, 0.4])  # F1
    assert drawn[2:] == [([2, 4, 5], [0.5] * 3), ([2, 4, 5], [0.6] * 3)]  # the tiers


def seed_run(group: str, accuracies: dict[int, float], rounds: int, seed: int = 0, **kw) -> report.SeedRun:
    return report.SeedRun(group, seed, gap_rows(accuracies, rounds, **kw), 0.6)


def test_report_figures_read_the_evaluated_rounds():
    run = seed_run("hlora", {3: 0.7, 6: 0.85, 7: 0.8}, 7)
    figures = report.seed_figures(run, target=0.8)
    assert figures["final_accuracy"] == 0.8 and figures["best_accuracy"] == 0.85
    assert figures["final_f1"] == 0.4 and figures["best_f1"] == 0.425
    assert figures["rounds_to_target"] == 6 and figures["wall_to_target_s"] == 6.0
    assert figures["tiers"][2]["final_accuracy"] == 0.5 and figures["rounds"] == 7
    assert report.rounds_to_target(run.rows, 0.9) is None


def test_mean_accuracy_difference_uses_the_rounds_both_evaluated():
    a = gap_rows({2: 0.6, 4: 0.8, 5: 0.9}, 5)
    b = gap_rows({1: 0.1, 2: 0.5, 3: 0.1, 4: 0.5, 5: 0.5}, 5)
    assert report._mean_accuracy_diff(a, b) == pytest.approx((0.6 + 0.8 + 0.9) / 3 - 0.5)
    assert report._mean_accuracy_diff(b, a) == pytest.approx(0.5 - (0.6 + 0.8 + 0.9) / 3)
    shorter = gap_rows({2: 0.4, 3: 0.4}, 3)  # rounds both ran and both evaluated: round 2 alone
    assert report._mean_accuracy_diff(a, shorter) == pytest.approx(0.6 - 0.4)


def test_curves_and_traffic_use_the_evaluated_rounds():
    runs = [
        seed_run("hlora", {2: 0.6, 4: 0.8, 5: 0.9}, 5, seed=0),
        seed_run("hlora", {2: 0.8, 4: 0.6, 5: 0.7}, 5, seed=1, bytes_per_round=30),
    ]
    ((x, mean, low, high),) = report._curves(runs, lambda rows: [r["round"] for r in rows]).values()
    assert list(x) == [2, 4, 5]
    assert list(mean) == pytest.approx([0.7, 0.7, 0.8]) and list(low) == [0.6, 0.6, 0.7]
    assert list(high) == [0.8, 0.8, 0.9]

    def cumulative(rows):
        return np.cumsum([r["uplink_bytes"] + r["downlink_bytes"] for r in rows])

    ((x, *_),) = report._curves(runs, cumulative).values()
    assert list(x) == [2 * 40, 4 * 40, 5 * 40]  # mean traffic of the two seeds up to rounds 2, 4, 5


def test_local_reference_rows_average_the_evaluated_rounds():
    rows = report.mean_rows([gap_rows({2: 0.6, 3: 0.8}, 3), gap_rows({2: 0.8, 3: 0.6}, 3)])
    assert ["accuracy" in r for r in rows] == [False, True, True]
    assert rows[1]["accuracy"] == pytest.approx(0.7) and rows[0]["wall_s"] == 2.0


def write_run(folder: Path, name: str, rows: list[dict], every: int) -> None:
    run_dir = folder / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = [r for r in rows if "accuracy" in r]
    summary = {
        "task": "mrpc", "method": name.split("-")[0], "num_clients": 2, "client_ranks": [2, 4],
        "bank_rank": 4, "majority_baseline": 0.6, "final_accuracy": scored[-1]["accuracy"],
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.toml").write_text(f"[eval]\nevery = {every}\n")


def test_report_of_runs_with_gaps_says_how_rounds_to_target_were_read(tmp_path):
    write_run(tmp_path, "hlora-s0", gap_rows({2: 0.6, 4: 0.8, 5: 0.9}, 5), every=2)
    write_run(tmp_path, "flexlora-s0", gap_rows({2: 0.5, 4: 0.7, 5: 0.7}, 5), every=2)
    paths = report.write_report(tmp_path, target=0.75)
    text = (tmp_path / "summary.md").read_text()
    assert "rounds to target are read on the evaluated rounds, every 2" in text
    assert "| hlora | 1 | 0.9000 | 0.9000 |" in text and "| 4.0 (1/1), 4 s |" in text
    paired = report.paired_table(report.load_results(tmp_path).runs, 0.75)
    assert paired[0]["mean_accuracy_diff_mean"] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert all(p.is_file() for p in paths)


def test_report_of_runs_scored_every_round_says_nothing_of_a_cadence(tmp_path):
    write_run(tmp_path, "hlora-s0", [{k: v for k, v in r.items() if k != "evaluated"}
                                     for r in gap_rows({1: 0.6, 2: 0.8}, 2)], every=1)  # fmt: skip
    report.write_report(tmp_path)
    assert "evaluated rounds" not in (tmp_path / "summary.md").read_text()
