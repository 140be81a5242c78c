"""The round loop end to end on the tiny model: files, metrics, traffic, reproducibility."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hlora import simulation
from hlora.client.client import FederatedClient
from hlora.errors import RunDirError
from hlora.federation.prepared import prepare
from hlora.rundir import create_run_dir, read_metrics


def run_once(settings, path):
    exp = prepare(settings)
    summary = simulation.run(exp, create_run_dir(path), progress=False)
    return exp, summary


def test_round_loop_writes_every_file_and_metric(tiny_settings, tmp_path):
    exp, summary = run_once(tiny_settings, tmp_path / "run")
    run_dir = tmp_path / "run"
    for name in ("config.toml", "partition.csv", "metrics.jsonl", "summary.json", "accuracy.png"):
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert {
            "accuracy",
            "f1",
            "train_loss",
            "uplink_bytes",
            "downlink_bytes",
            "clients",
            "wall_s",
        } <= r.keys()
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["f1"] <= 1.0
        assert r["clients"] == [0, 1, 2]
        assert r["train_loss"] > 0
        assert r["aggregated_clients"] == [0, 1, 2] and not r["round_failed"]
        assert sorted(r["client_update_norm"]) == ["0", "1", "2"]
        assert r["rejected"] == r["failed_clients"] == r["corrupted_clients"] == {}
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == summary
    assert saved["rounds"] == 2 and saved["final_accuracy"] == rows[-1]["accuracy"]
    assert saved["total_uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    assert saved["failed_rounds"] == 0 and saved["rejected_by_reason"] == {}
    assert (run_dir / "partition.csv").read_text().splitlines()[0].startswith("client,size")


def test_traffic_counts_the_tensors_exchanged(tiny_settings, tmp_path):
    run_once(tiny_settings, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    # tiny BERT: 2 layers x (query, value), B 32x4 and A 4x32; head 2x32 + 2; float32; 3 clients
    per_client = (2 * 2 * (32 * 4 + 4 * 32) + 2 * 32 + 2) * 4
    assert rows[0]["uplink_bytes"] == rows[0]["downlink_bytes"] == 3 * per_client


def test_same_seed_same_metrics_and_adapter(tiny_settings, tmp_path):
    exp1, _ = run_once(tiny_settings, tmp_path / "a")
    exp2, _ = run_once(tiny_settings, tmp_path / "b")
    strip = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(tmp_path / "a")]
    again = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(tmp_path / "b")]
    assert strip == again
    w1, w2 = exp1.model.read(4).tensors(), exp2.model.read(4).tensors()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_client_that_claims_another_size_changes_nothing(tiny_settings, tmp_path, monkeypatch):
    """The server weighs each update by its client's partition, whatever the client claims: a claim of a
    million rows leaves every metric and the adapter as an honest run's, and is recorded."""
    honest, _ = run_once(tiny_settings, tmp_path / "honest")
    real = FederatedClient.fit

    def lying(self, plan, seed):
        update, result = real(self, plan, seed)
        return (replace(update, num_samples=10**6) if self.client_id == 1 else update), result

    monkeypatch.setattr(FederatedClient, "fit", lying)
    liar, _ = run_once(tiny_settings, tmp_path / "liar")
    assert liar.server.client_sizes == {cid: len(part) for cid, part in enumerate(liar.partitions)}
    rows = read_metrics(tmp_path / "liar")
    assert [r["misreported_samples"] for r in rows] == [{"1": 10**6}] * 2
    assert all(r["misreported_samples"] == {} for r in read_metrics(tmp_path / "honest"))
    drop = ("misreported_samples",)
    strip = [{k: v for k, v in r.items() if not k.endswith("_s") and k not in drop} for r in rows]
    assert strip == [
        {k: v for k, v in r.items() if not k.endswith("_s") and k not in drop}
        for r in read_metrics(tmp_path / "honest")
    ]
    w1, w2 = honest.server.global_weights.tensors(), liar.server.global_weights.tensors()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_another_seed_changes_the_run(tiny_settings, tmp_path):
    run_once(tiny_settings, tmp_path / "a")
    run_once(
        tiny_settings.model_copy(update={"run": tiny_settings.run.model_copy(update={"seed": 1})}),
        tmp_path / "b",
    )
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "a")]
    assert losses != [r["train_loss"] for r in read_metrics(tmp_path / "b")]


def test_client_sampling_and_training_move_the_model(tiny_settings, tmp_path):
    fed = tiny_settings.federation.model_copy(update={"clients_per_round": 2, "rounds": 3})
    settings = tiny_settings.model_copy(update={"federation": fed})
    exp, _ = run_once(settings, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert all(len(r["clients"]) == 2 for r in rows)
    assert len({tuple(r["clients"]) for r in rows}) > 1  # a seeded draw per round, not one fixed pair
    trained = exp.model.read(4)
    assert any(torch.count_nonzero(f.B) > 0 for f in trained.factors.values())  # B starts at zero


def test_centralized_mode_is_one_client_with_all_the_data(tiny_settings, tmp_path):
    settings = tiny_settings.model_copy(
        update={"run": tiny_settings.run.model_copy(update={"mode": "centralized"})}
    )
    exp, summary = run_once(settings, tmp_path / "run")
    assert len(exp.partitions) == 1 and len(exp.partitions[0]) == 48
    assert summary["mode"] == "centralized" and summary["num_clients"] == 1
    assert all(r["clients"] == [0] for r in read_metrics(tmp_path / "run"))


def test_existing_run_directory_is_never_reused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(RunDirError, match="exists already"):
        create_run_dir(tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "precious\n"
