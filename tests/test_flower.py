"""The Flower runtime for real: a SuperLink and SuperNodes as processes on loopback (tests/flower_cluster.py),
the apps submitted with `flwr run`, the tiny model.

- parity: 2 rounds of HLoRA at ranks 1, 2 and 4 end with the simulation's global adapter, and the
  traffic counted from the real messages is the simulation's;
- a SuperNode killed after round 1 and started again: round 2 aggregates the two replies it got
  (min_clients 2) and records the dead node in failed_clients; in round 3 the restarted node (a new
  node id) holds its partition again;
- TLS and SuperNode authentication: a CA and keys from scripts/make_test_certs.py, 2 nodes, 1 round.

Slower than the rest of the suite: every message starts a ClientApp process (torch and transformers
imported each time), and Flower polls every few seconds: 46 s, 106 s and 26 s on 2 idle cores, several
times that on a busy machine, where Flower can also drop a starved ClientApp's task (its runtime token
expires) and a round then records timeouts. tests/test_flower_strategy.py covers the same logic in one
process in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hlora import simulation
from hlora.config import settings_to_toml, validate_settings
from hlora.federation.prepared import prepare
from hlora.rundir import METRICS_FILE, SUMMARY_FILE, create_run_dir, read_metrics

from .flower_cluster import REPO, Cluster, PortTaken, free_port, listening, start_process, wait_for

# In the default suite, so CI runs them (issue 6): about 3 minutes on 2 idle cores.
pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 900  # a whole run, on a busy 2-core machine
REFUSE_TIMEOUT_S = 300  # for a refused SuperNode to give up, on a busy machine


def mixed(settings, **federation):
    raw = settings.model_dump()
    raw["lora"].update(rank_policy="tiers", tiers=[1, 2, 4])
    raw["federation"].update({"method": "hlora", **federation})
    return validate_settings(raw)


def nodes(n: int) -> list[str]:
    return [f"partition-id={k} num-partitions={n}" for k in range(n)]


def submit(cluster: Cluster, settings, out: Path, **run_config) -> None:
    config = cluster.root / "hlora.toml"
    config.write_text(settings_to_toml(settings), encoding="utf-8")
    cluster.submit({"config": str(config), "out": str(out), "node-timeout": 600.0, **run_config})


def test_a_flower_run_ends_with_the_simulations_adapter_and_traffic(tiny_settings, tmp_path):
    settings = mixed(tiny_settings)
    out = tmp_path / "flower-run"
    with Cluster(tmp_path / "cluster", nodes(3)) as cluster:
        submit(cluster, settings, out, **{"reply-timeout": 600.0})
        wait_for(out / SUMMARY_FILE, cluster, RUN_TIMEOUT_S)
    sim = tmp_path / "sim"
    simulation.run(prepare(settings), create_run_dir(sim), progress=False)
    got = load_file(out / "checkpoint/adapter.safetensors")
    want = load_file(sim / "checkpoint/adapter.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    rows, sim_rows = read_metrics(out), read_metrics(sim)
    assert [r["round"] for r in rows] == [1, 2]
    for row, sim_row in zip(rows, sim_rows, strict=True):
        for key in ("uplink_bytes", "downlink_bytes", "client_uplink_bytes", "client_downlink_bytes",
                    "client_ranks", "aggregated_clients", "failed_clients", "rejected", "invalid_reports"):
            assert row[key] == sim_row[key], key
        assert len(set(row["client_ranks"].values())) == 3  # mixed ranks, one client in each tier
        assert row["accuracy"] == pytest.approx(sim_row["accuracy"], abs=1e-6)
        assert row["train_loss"] == pytest.approx(sim_row["train_loss"], rel=1e-5)


def test_a_node_killed_mid_run_is_recorded_and_its_restart_takes_its_partition_back(tiny_settings, tmp_path):
    settings = mixed(tiny_settings, min_clients=2, rounds=3)
    out = tmp_path / "flower-run"
    with Cluster(tmp_path / "cluster", nodes(3)) as cluster:
        submit(cluster, settings, out, **{"reply-timeout": 300.0})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        metrics = out / METRICS_FILE
        while not (metrics.exists() and metrics.read_text(encoding="utf-8").count("\n") >= 1):
            assert time.monotonic() < deadline, cluster.tail()
            time.sleep(0.1)
        cluster.kill("node2")  # round 1 is written: round 2's message reaches a dead node
        cluster.start_node(2, nodes(3)[2])  # back under a new node id, with empty state
        wait_for(out / SUMMARY_FILE, cluster, RUN_TIMEOUT_S)
    rows = read_metrics(out)
    assert rows[0]["failed_clients"] == {} and rows[0]["aggregated_clients"] == [0, 1, 2]
    assert set(rows[1]["failed_clients"]) == {"2"}
    assert rows[1]["failed_clients"]["2"] in ("timeout", "unavailable")
    assert rows[1]["aggregated_clients"] == [0, 1] and not rows[1]["round_failed"]
    assert rows[2]["failed_clients"] == {} and rows[2]["aggregated_clients"] == [0, 1, 2]
    summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary["rounds"] == 3 and sum(summary["failed_clients_by_kind"].values()) == 1


def _make_certs(folder: Path, nodes: int) -> None:
    spec = importlib.util.spec_from_file_location("make_test_certs", REPO / "scripts/make_test_certs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_certs(folder, [], nodes)


def test_a_run_over_tls_with_authenticated_supernodes(tiny_settings, tmp_path):
    raw = mixed(tiny_settings).model_dump()
    raw["federation"].update(num_clients=2, clients_per_round=2, rounds=1)
    raw["lora"]["tiers"] = [2, 4]
    settings = validate_settings(raw)
    certs = tmp_path / "certs"
    _make_certs(certs, nodes=2)
    out = tmp_path / "flower-run"
    with Cluster(tmp_path / "cluster", nodes(2), tls=certs, auth=True) as cluster:
        submit(cluster, settings, out, **{"reply-timeout": 600.0})
        wait_for(out / SUMMARY_FILE, cluster, RUN_TIMEOUT_S)
        log = cluster.logs["superlink"].read_text(encoding="utf-8", errors="replace")
    rows = read_metrics(out)
    assert len(rows) == 1 and rows[0]["aggregated_clients"] == [0, 1]
    assert "http://" not in log.split("Uvicorn running on", 1)[-1].splitlines()[0]  # it serves HTTPS


def test_a_supernode_whose_key_was_never_registered_is_refused(tmp_path):
    """Under SuperNode authentication, node 1 connects with a key pair that was never registered (node
    0's was): the SuperLink refuses to activate it, the SuperNode exits saying so, and the SuperLink
    lists node 0 alone, online."""
    certs = tmp_path / "certs"
    _make_certs(certs, nodes=2)
    with Cluster(tmp_path / "cluster", nodes(2)[:1], tls=certs, auth=True) as cluster:
        cluster.start_node(1, nodes(2)[1])
        deadline = time.monotonic() + REFUSE_TIMEOUT_S
        while cluster.alive("node1") or not _online(cluster):
            assert time.monotonic() < deadline, cluster.tail()
            time.sleep(0.5)
        listed = _listed(cluster)
        node_log = cluster.logs["node1"].read_text(encoding="utf-8", errors="replace")
        link_log = cluster.logs["superlink"].read_text(encoding="utf-8", errors="replace")
    assert cluster.procs["node1"].returncode != 0
    assert "Failed to activate SuperNode" in node_log
    assert "No SuperNode found with the given public key" in link_log
    assert [node["status"] for node in listed] == ["online"]  # node 0, and nothing of node 1


def _listed(cluster: Cluster) -> list[dict]:
    """The SuperNodes the SuperLink knows (`flwr supernode list`)."""
    done = cluster.flwr("supernode", "list", "test", "--format", "json")
    return json.loads(done.stdout)["nodes"] if done.returncode == 0 else []


def _online(cluster: Cluster) -> bool:
    return any(node["status"] == "online" for node in _listed(cluster))


def test_a_process_that_loses_its_free_port_is_told_apart_so_that_the_cluster_tries_another(tmp_path):
    """The port was free when chosen and another program bound it before the process did: that exit
    raises PortTaken (the cluster then starts the process again on a new port), in seconds."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        server = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        with pytest.raises(PortTaken, match="(?i)address already in use"):
            start_process(server, tmp_path / "server.log", tmp_path, {}, ready=lambda: False, timeout=120)
    procs = []
    proc = start_process(server, tmp_path / "server.log", tmp_path, {}, ready=lambda: listening(port),
                         timeout=120, on_start=procs.append)
    try:
        assert procs == [proc] and proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=60)
