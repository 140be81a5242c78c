"""One small run on the real packaged model and real MRPC rows."""

from __future__ import annotations

import pytest

from hlora import simulation
from hlora.config import validate_settings
from hlora.federation.prepared import prepare
from hlora.rundir import create_run_dir, read_metrics


@pytest.mark.integration
def test_packaged_model_two_clients_two_rounds(glue_dir, tmp_path):
    settings = validate_settings(
        {
            "run": {"seed": 0, "device": "cpu"},
            "data": {
                "task": "mrpc",
                "data_dir": str(glue_dir),
                "max_train_samples": 64,
                "max_eval_samples": 64,
            },
            "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2},
            "train": {"batch_size": 16, "local_steps": 2},
        }
    )
    exp = prepare(settings)
    summary = simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    rows = read_metrics(tmp_path / "run")
    assert type(exp.model.module.base_model.model).__name__ == "BertForSequenceClassification"
    assert len(rows) == 2 and summary["rounds"] == 2
    # all-MiniLM-L6-v2: 6 layers x (query, value), each 384x8 + 8x384, plus the 2x384 head, float32
    per_client = (6 * 2 * 2 * 384 * 8 + 2 * 384 + 2) * 4
    assert rows[0]["uplink_bytes"] == 2 * per_client
    assert all(0.0 < r["accuracy"] < 1.0 and r["train_loss"] > 0 for r in rows)
