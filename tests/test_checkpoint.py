"""Checkpoints and resume: a run stopped anywhere and resumed ends as the run that never stopped.

The server's state round-trips through the checkpoint files for every method; runs crashed in-process
mid-round, or killed with SIGKILL in a subprocess, resume to the same metrics (timings aside) and the
bit-identical global adapter; a resume that cannot go on says why in one line and changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import hlora
from hlora import checkpoint, simulation
from hlora import config as cfg
from hlora.aggregation import registry
from hlora.checkpoint import Checkpoint
from hlora.cli.main import main
from hlora.config import Settings, load_settings, settings_to_toml, validate_settings
from hlora.errors import CheckpointError
from hlora.federation import prepared
from hlora.federation import round as engine
from hlora.federation.prepared import prepare
from hlora.federation.server import FederatedServer
from hlora.protocol import ClientUpdate
from hlora.rundir import MetricsLog, create_run_dir, lock_run_dir, read_metrics
from hlora.weights import AdapterWeights, LoraFactors

# --- the server's state, without a model --------------------------------------------------------------


def toy_server(method: str, client_ranks: dict[int, int]) -> FederatedServer:
    """A server over two adapted 6 x 5 weights and a head, two of three clients a round."""
    bank_rank = max(client_ranks.values())
    g = torch.Generator().manual_seed(1)
    factors = {
        f"layer{i}": LoraFactors(torch.zeros(6, bank_rank), torch.randn(bank_rank, 5, generator=g))
        for i in range(2)
    }
    initial = AdapterWeights(factors, {"head.weight": torch.randn(2, 6, generator=g)})
    return FederatedServer(registry.create(method, bank_rank, seed=0), initial, client_ranks, 2, seed=0)


def toy_round(server: FederatedServer, rnd: int) -> None:
    """One round whose clients 'train' by adding seeded noise to what they were sent."""
    updates = []
    for cid, plan in server.configure(rnd).items():
        g = torch.Generator().manual_seed(100 * rnd + cid)
        start = plan.adapter
        factors = {
            name: LoraFactors(
                f.B + torch.randn(f.B.shape, generator=g),
                f.A + torch.randn(f.A.shape, generator=g) if plan.train_a else f.A,
            )
            for name, f in start.factors.items()
        }
        dense = {name: t + torch.randn(t.shape, generator=g) for name, t in start.dense.items()}
        updates.append(ClientUpdate(cid, 10 + cid, AdapterWeights(factors, dense)))
    server.aggregate(rnd, updates)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("method", registry.names())
def test_server_state_round_trips_through_the_checkpoint_files(method, tmp_path):
    ranks = {0: 4, 1: 4, 2: 4} if method == "fedit" else {0: 2, 1: 4, 2: 3}
    server = toy_server(method, ranks)
    for rnd in (1, 2, 3):
        toy_round(server, rnd)
    Checkpoint(3, server.state_dict(), {"metrics": []}).write(tmp_path)
    read = Checkpoint.read(tmp_path)
    assert read is not None and read.round == 3
    fresh = toy_server(method, ranks)
    fresh.load_state_dict(read.server)
    assert_same_state(fresh.state_dict(), server.state_dict())
    assert fresh.version == 3 and fresh._synced == server._synced
    # and both go on alike: the same plans (FLoRA: the stacks a client lacks), the same next aggregate
    plans, again = server.configure(4), fresh.configure(4)
    assert plans.keys() == again.keys()
    for cid in plans:
        assert_same_state(plans[cid].downlink(), again[cid].downlink())
    toy_round(server, 5)
    toy_round(fresh, 5)
    assert_same_state(fresh.state_dict(), server.state_dict())


def test_flora_writes_each_stack_once_as_a_block(tmp_path, monkeypatch):
    server = toy_server("flora", {0: 2, 1: 4, 2: 3})
    written = []
    write_temp = checkpoint.write_temp
    monkeypatch.setattr(
        checkpoint, "write_temp", lambda path, *a, **k: written.append(path.name) or write_temp(path, *a, **k)
    )
    for rnd in (1, 2, 3):
        toy_round(server, rnd)
        Checkpoint(rnd, server.state_dict(), {"metrics": []}).write(tmp_path)
    # each commit wrote the three files and the one stack its round added, never an earlier one again
    main_files = ["adapter.safetensors", "aggregator.safetensors", "state.json"]
    assert written == [n for v in (1, 2, 3) for n in (f"delta.{v}.safetensors", *main_files)]
    folder = tmp_path / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == 2 and state["server"]["aggregator"] == {"deltas": 3}
    assert state["server"]["blocks"] == ["delta.1", "delta.2", "delta.3"]
    assert load_file(folder / "aggregator.safetensors") == {}
    # a stack's rank is the round's total client rank (two clients a round)
    for version, delta in enumerate(server.aggregator.deltas, start=1):
        saved = load_file(folder / "blocks" / f"delta.{version}.safetensors")
        assert torch.equal(saved["layer0.lora_A"], delta.weights.factors["layer0"].A)
        assert saved["layer0.lora_A"].shape[0] == sum(
            server.client_ranks[c] for c in delta_clients(server, version)
        )
    fresh = toy_server("flora", {0: 2, 1: 4, 2: 3})
    fresh.load_state_dict(Checkpoint.read(tmp_path).server)
    assert_same_state(fresh.state_dict(), server.state_dict())


def delta_clients(server: FederatedServer, version: int) -> list[int]:
    """The clients whose adapters made stack `version` (toy_round: the round's sampled clients)."""
    return sorted(server.sample(version))


def test_a_checkpoint_of_format_1_still_resumes(tmp_path):
    """Before blocks, FLoRA's stacks were flat `deltas.<version>.<name>` tensors of the aggregator file."""
    server = toy_server("flora", {0: 2, 1: 4, 2: 3})
    for rnd in (1, 2):
        toy_round(server, rnd)
    Checkpoint(2, server.state_dict(), {"metrics": []}).write(tmp_path)
    folder = tmp_path / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    flat = {
        f"deltas.{v}.{k}": t
        for v in (1, 2)
        for k, t in load_file(folder / "blocks" / f"delta.{v}.safetensors").items()
    }
    shutil.rmtree(folder / "blocks")
    (folder / "aggregator.safetensors").write_bytes(save(flat, metadata={"hlora_round": "2"}))
    del state["server"]["blocks"]
    state["format"] = 1
    (folder / "state.json").write_text(json.dumps(state))
    fresh = toy_server("flora", {0: 2, 1: 4, 2: 3})
    fresh.load_state_dict(Checkpoint.read(tmp_path).server)
    assert_same_state(fresh.state_dict(), server.state_dict())
    # the next commit writes the new format, every stack as a block
    toy_round(fresh, 3)
    Checkpoint(3, fresh.state_dict(), {"metrics": []}).write(tmp_path)
    assert sorted(p.name for p in (folder / "blocks").iterdir()) == [
        f"delta.{v}.safetensors" for v in (1, 2, 3)
    ]


def test_a_missing_or_swapped_block_is_a_damaged_checkpoint_and_a_stray_one_is_removed(tmp_path):
    server = toy_server("flora", {0: 2, 1: 4, 2: 3})
    for rnd in (1, 2):
        toy_round(server, rnd)
        Checkpoint(rnd, server.state_dict(), {"metrics": []}).write(tmp_path)
    blocks = tmp_path / "checkpoint" / "blocks"
    # a killed round's stack, never committed: the next commit removes it
    (blocks / "delta.3.safetensors").write_bytes((blocks / "delta.2.safetensors").read_bytes())
    (blocks / ".delta.4.safetensors.tmp").write_bytes(b"half")
    Checkpoint(2, server.state_dict(), {"metrics": []}).write(tmp_path)
    assert sorted(p.name for p in blocks.iterdir()) == ["delta.1.safetensors", "delta.2.safetensors"]
    shutil.copy(blocks / "delta.2.safetensors", blocks / "delta.1.safetensors")
    with pytest.raises(CheckpointError, match=r"delta.1.safetensors holds block 'delta.2', not 'delta.1'"):
        Checkpoint.read(tmp_path)
    (blocks / "delta.1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"delta.1.safetensors is missing, but state.json names it"):
        Checkpoint.read(tmp_path)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    state["server"]["blocks"] = ["../../adapter"]
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="block name '../../adapter' is not a plain file name"):
        Checkpoint.read(tmp_path)


def test_a_state_that_does_not_fit_is_refused():
    server = toy_server("hlora", {0: 2, 1: 4, 2: 4})
    toy_round(server, 1)
    state = server.state_dict()
    with pytest.raises(ValueError, match="keeps no state"):
        toy_server("hlora", {0: 2, 1: 4, 2: 4}).load_state_dict({**state, "aggregator": {"deltas": 1}})
    with pytest.raises(ValueError, match="layer0.lora_A"):
        toy_server("hlora", {0: 2, 1: 8, 2: 8}).load_state_dict(state)  # another bank rank


# --- the config a checkpoint belongs to ---------------------------------------------------------------


def checkpoint_of(stored: dict, fingerprint: str | None = None) -> Checkpoint:
    """A checkpoint of round 3 that records the config `stored` (None: one of an hlora that recorded only
    the fingerprint), fingerprinted as the hlora that wrote it would have."""
    digest = fingerprint or cfg.settings_digest(stored)
    run = {"fingerprint": digest} if fingerprint else {"fingerprint": digest, "settings": stored}
    return Checkpoint(3, {}, run)


def older(settings: Settings, *missing: str) -> dict:
    """`settings` as an hlora without the `section.key`s `missing` recorded it."""
    stored = cfg.fingerprinted(settings)
    for key in missing:
        section, name = key.split(".")
        del stored[section][name]
    return stored


def changed(settings: Settings, **sections) -> Settings:
    """`settings` with `section={key: value}` updates."""
    raw = settings.model_dump()
    for section, values in sections.items():
        raw[section].update(values)
    return validate_settings(raw)


def test_a_checkpoint_belongs_to_the_config_it_records(tiny_settings):
    checkpoint.check_config(checkpoint_of(cfg.fingerprinted(tiny_settings)), tiny_settings)
    # the rounds may change (a resume extends a run), and the run's name does not change results
    longer = changed(tiny_settings, federation={"rounds": 9}, run={"name": "other"})
    checkpoint.check_config(checkpoint_of(cfg.fingerprinted(tiny_settings)), longer)
    assert cfg.fingerprint(longer) == cfg.fingerprint(tiny_settings)


def test_a_checkpoint_of_another_config_names_what_differs(tiny_settings):
    edited = changed(tiny_settings, train={"lr": 0.123, "batch_size": 3})
    with pytest.raises(CheckpointError) as info:
        checkpoint.check_config(checkpoint_of(cfg.fingerprinted(tiny_settings)), edited)
    was_lr, was_batch = tiny_settings.train.lr, tiny_settings.train.batch_size
    assert f"(train.lr = {was_lr!r} there, 0.123 here; train.batch_size = {was_batch} there, 3 here)" in str(
        info.value
    )


def test_a_setting_added_since_the_checkpoint_counts_only_away_from_its_default(tiny_settings):
    """A run started by an hlora without `train.precision` and `faults.crash` resumes where both hold
    their defaults (the behaviour the run had), and not where one was set."""
    stored = older(tiny_settings, "train.precision", "faults.crash")
    assert cfg.config_differences(stored, tiny_settings) == []
    checkpoint.check_config(checkpoint_of(stored), tiny_settings)
    bf16 = changed(tiny_settings, train={"precision": "bf16"})
    assert cfg.config_differences(stored, bf16) == [("train.precision", None, "bf16")]
    with pytest.raises(CheckpointError, match=r"\(train.precision = None there, 'bf16' here\)"):
        checkpoint.check_config(checkpoint_of(stored), bf16)
    # a setting this hlora no longer has is a difference: its effect cannot be kept
    stored["train"]["retired"] = 1
    assert cfg.config_differences(stored, tiny_settings) == [("train.retired", 1, None)]


def test_a_key_added_to_an_optional_section_counts_only_away_from_its_default(tiny_settings):
    """[secure] is recorded only when on; a secure run started before `secure.stage_dropouts` existed
    resumes where it holds its default."""
    secure = changed(tiny_settings, federation={"method": "hlora"}, secure={"enabled": True})
    stored = older(secure, "secure.stage_dropouts")
    assert "secure" in stored and "stage_dropouts" not in stored["secure"]
    assert cfg.config_differences(stored, secure) == []
    other = changed(secure, secure={"stage_dropouts": "renormalise"})
    assert cfg.config_differences(stored, other) == [("secure.stage_dropouts", None, "renormalise")]


def test_a_checkpoint_with_only_a_fingerprint_is_checked_by_it(tiny_settings):
    """Checkpoints written before they recorded their config: the same config resumes; another cannot be
    told from an older hlora's, and the error says both."""
    same = checkpoint_of({}, fingerprint=cfg.fingerprint(tiny_settings))
    checkpoint.check_config(same, tiny_settings)
    other = changed(tiny_settings, train={"lr": 0.123})
    with pytest.raises(CheckpointError, match="another config than this config.toml, or by an hlora whose"):
        checkpoint.check_config(same, other)


# --- the commit point ---------------------------------------------------------------------------------


def test_a_commit_stopped_between_its_renames_is_read_whole(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "next").mkdir()
    server = toy_server("flora", {0: 2, 1: 4, 2: 3})
    toy_round(server, 1)
    Checkpoint(1, server.state_dict(), {"metrics": [{"round": 1}]}).write(tmp_path / "run")
    toy_round(server, 2)
    Checkpoint(2, server.state_dict(), {"metrics": [{"round": 1}, {"round": 2}]}).write(tmp_path / "next")
    run, nxt = tmp_path / "run" / "checkpoint", tmp_path / "next" / "checkpoint"
    # killed after the first rename of round 2's commit: its blocks and the adapter are in place, the rest
    # still .tmp
    shutil.copytree(nxt / "blocks", run / "blocks", dirs_exist_ok=True)
    shutil.copy(nxt / "adapter.safetensors", run / "adapter.safetensors")
    shutil.copy(nxt / "aggregator.safetensors", run / ".aggregator.safetensors.tmp")
    shutil.copy(nxt / "state.json", run / ".state.json.tmp")
    read = Checkpoint.read(tmp_path / "run")
    assert read.round == 2 and read.metrics == [{"round": 1}, {"round": 2}]
    assert_same_state(read.server, Checkpoint.read(tmp_path / "next").server)


def test_the_next_save_finishes_a_stopped_commit_before_it_writes(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "next").mkdir()
    server = toy_server("flora", {0: 2, 1: 4, 2: 3})
    toy_round(server, 1)
    Checkpoint(1, server.state_dict(), {"metrics": []}).write(tmp_path / "run")
    toy_round(server, 2)
    Checkpoint(2, server.state_dict(), {"metrics": []}).write(tmp_path / "next")
    run, nxt = tmp_path / "run" / "checkpoint", tmp_path / "next" / "checkpoint"
    shutil.copytree(nxt / "blocks", run / "blocks", dirs_exist_ok=True)  # stopped as above
    shutil.copy(nxt / "adapter.safetensors", run / "adapter.safetensors")
    shutil.copy(nxt / "aggregator.safetensors", run / ".aggregator.safetensors.tmp")
    shutil.copy(nxt / "state.json", run / ".state.json.tmp")
    # Round 3's commit is killed once its aggregator file is written (the third fsync, after its new
    # stack's and the adapter's): the round-2 .state.json.tmp must not pair with it, so the save had
    # finished round 2's renames first.
    fsyncs = []

    def killed_at_the_third(fd, fsync=os.fsync):
        fsyncs.append(fd)
        if len(fsyncs) == 3:
            raise Crash
        fsync(fd)

    toy_round(server, 3)
    monkeypatch.setattr(os, "fsync", killed_at_the_third)
    with pytest.raises(Crash):
        Checkpoint(3, server.state_dict(), {"metrics": []}).write(tmp_path / "run")
    monkeypatch.undo()
    assert Checkpoint.read(tmp_path / "run").round == 2
    assert json.loads((run / "state.json").read_text())["round"] == 2
    Checkpoint(3, server.state_dict(), {"metrics": []}).write(tmp_path / "run")
    assert Checkpoint.read(tmp_path / "run").round == 3
    names = ["adapter.safetensors", "aggregator.safetensors", "blocks", "state.json"]
    assert sorted(p.name for p in run.iterdir()) == names  # no temporary file left
    assert sorted(p.name for p in (run / "blocks").iterdir()) == [f"delta.{v}.safetensors" for v in (1, 2, 3)]


def test_a_commit_killed_while_writing_leaves_the_last_one(tmp_path):
    server = toy_server("hlora", {0: 2, 1: 4, 2: 4})
    toy_round(server, 1)
    Checkpoint(1, server.state_dict(), {"metrics": []}).write(tmp_path)
    folder = tmp_path / "checkpoint"
    (folder / ".adapter.safetensors.tmp").write_bytes((folder / "adapter.safetensors").read_bytes()[:50])
    (folder / ".state.json.tmp").write_text('{"format": 1, "round": 2, "ser')
    assert Checkpoint.read(tmp_path).round == 1


def test_tensors_of_another_round_than_the_state_are_a_damaged_checkpoint(tmp_path):
    server = toy_server("hlora", {0: 2, 1: 4, 2: 4})
    toy_round(server, 1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Checkpoint(1, server.state_dict(), {"metrics": []}).write(tmp_path / "a")
    Checkpoint(2, server.state_dict(), {"metrics": []}).write(tmp_path / "b")
    shutil.copy(tmp_path / "b/checkpoint/adapter.safetensors", tmp_path / "a/checkpoint/adapter.safetensors")
    with pytest.raises(hlora.errors.CheckpointError, match="holds round 2, but state.json names round 1"):
        Checkpoint.read(tmp_path / "a")


# --- whole runs on the tiny model ---------------------------------------------------------------------


def configured(settings: Settings, method: str, **sections) -> Settings:
    """`settings` with `federation.method = method`, mixed ranks 2/4 for the methods that take them,
    and any `section={key: value}` updates."""
    raw = settings.model_dump()
    raw["federation"].update(method=method, clients_per_round=2, rounds=3)
    if method != "fedit":
        raw["lora"].update(rank_policy="tiers", tiers=[2, 4])
    for section, values in sections.items():
        raw[section].update(values)
    return validate_settings(raw)


def without_timings(rows):
    # timings, and when, by which command and on how busy a machine a run finished (`environment`: a
    # resumed run's is the resuming command's), differ between two runs of the same rounds; nothing else may
    ignored = ("command", "finished_utc", "load_avg")
    return [
        {
            k: {e: x for e, x in v.items() if e not in ignored} if k == "environment" else v
            for k, v in row.items()
            if not k.endswith("_s")
        }
        for row in rows
    ]


def assert_same_run(a: Path, b: Path) -> None:
    """The same metrics (timings aside), the bit-identical checkpoint, summary and plot."""
    assert without_timings(read_metrics(b)) == without_timings(read_metrics(a))
    blocks = sorted(p.name for p in (a / "checkpoint").glob("blocks/*"))
    assert blocks == sorted(p.name for p in (b / "checkpoint").glob("blocks/*"))
    for name in ("adapter.safetensors", "aggregator.safetensors", *(f"blocks/{n}" for n in blocks)):
        assert_same_state(load_file(a / "checkpoint" / name), load_file(b / "checkpoint" / name))
    state_a, state_b = (json.loads((d / "checkpoint" / "state.json").read_text()) for d in (a, b))
    assert state_b["rng"] == state_a["rng"] and state_b["server"] == state_a["server"]
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert without_timings([summary_b]) == without_timings([summary_a])
    assert (a / "accuracy.png").read_bytes() == (b / "accuracy.png").read_bytes()


class Crash(Exception):
    pass


def resume_in_process(run_dir: Path) -> None:
    settings, ckpt = checkpoint.open_resume(run_dir)
    simulation.run(prepare(settings), run_dir, progress=False, resume=ckpt)


@pytest.mark.parametrize(
    ("method", "crash", "every"),
    [
        ("fedit", "aggregate", 1),
        ("hlora", "aggregate", 1),
        ("hlora", "commit", 1),
        ("hlora", "append", 1),
        ("flora", "aggregate", 1),
        ("ffa", "aggregate", 1),
        # eval.every: round 1 not evaluated (FLoRA's base not merged for it), round 2 evaluated
        ("flora", "aggregate", 2),
        ("hlora", "commit", 2),
    ],
)
def test_a_run_crashed_in_round_2_resumes_to_the_uninterrupted_run(
    tiny_settings, tmp_path, monkeypatch, method, crash, every
):
    settings = configured(tiny_settings, method, eval={"every": every})
    simulation.run(prepare(settings), create_run_dir(tmp_path / "whole"), progress=False)

    def aggregate(server, rnd, updates, original=FederatedServer.aggregate):
        if rnd == 2:
            raise Crash
        return original(server, rnd, updates)

    def save_checkpoint(run_dir, exp, rnd, metrics, original=prepared.save_checkpoint):
        if rnd == 2:
            raise Crash
        original(run_dir, exp, rnd, metrics)

    def append(log, row, original=MetricsLog.append):
        if row["round"] == 2:
            raise Crash
        original(log, row)

    run_dir = create_run_dir(tmp_path / "crashed")
    exp = prepare(settings)
    with monkeypatch.context() as patch:
        if crash == "aggregate":  # mid-round: the clients have trained, the server has not aggregated
            patch.setattr(FederatedServer, "aggregate", aggregate)
        elif crash == "commit":  # round 2's checkpoint not committed: nothing of round 2 is on disk
            patch.setattr(engine, "save_checkpoint", save_checkpoint)
        else:  # round 2 committed, its row not yet in metrics.jsonl: the resumed run writes it back
            patch.setattr(MetricsLog, "append", append)
        with pytest.raises(Crash):
            simulation.run(exp, run_dir, progress=False)
    assert len(read_metrics(run_dir)) == 1
    assert checkpoint.open_resume(run_dir)[1].round == (2 if crash == "append" else 1)
    assert not (run_dir / "summary.json").exists()

    resume_in_process(run_dir)
    assert [row["round"] for row in read_metrics(run_dir)] == [1, 2, 3]
    assert [row["evaluated"] for row in read_metrics(run_dir)] == [every == 1, True, True]
    assert_same_run(tmp_path / "whole", run_dir)


def test_restore_run_rebuilds_the_global_model(tiny_settings, tmp_path):
    settings = configured(tiny_settings, "flora")
    exp = prepare(settings)
    simulation.run(exp, create_run_dir(tmp_path / "run"), progress=False)
    restored = prepared.restore_run(tmp_path / "run")
    assert restored.server.version == 3 and restored.model.merged_version == 3
    assert_same_state(restored.server.state_dict(), exp.server.state_dict())
    assert_same_state(restored.model.read(4).tensors(), exp.server.global_weights.tensors())
    # the merged base weights are the run's, bit for bit
    base = dict(exp.model.module.named_parameters())
    for name, p in restored.model.module.named_parameters():
        if "base_layer" in name:
            assert torch.equal(p, base[name]), name


# --- hlora run --resume -------------------------------------------------------------------------------


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime: what "nothing changed" compares."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, glue_dir) -> Path:
    """A complete two-round FedIT run on the tiny model."""
    settings = validate_settings(
        {
            "run": {"seed": 0, "device": "cpu"},
            "data": {
                "task": "mrpc",
                "data_dir": str(glue_dir),
                "max_length": 48,
                "max_train_samples": 48,
                "max_eval_samples": 32,
            },
            "model": {"name_or_path": str(tiny_model_dir)},
            "lora": {"rank": 4},
            "federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 2, "min_client_size": 4},
            "train": {"lr": 5e-3, "batch_size": 8, "local_steps": 2},
            "eval": {"batch_size": 16},
        }
    )
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    simulation.run(prepare(settings), create_run_dir(run_dir), progress=False)
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)  # copy2: contents and mtimes
    return to


def cli_error(capsys, *args: str) -> str:
    """Run `hlora` in-process; expect exit status 2 and one line on stderr, and return that line."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hlora: error: ") and "\n" not in err, err
    return err


def edit_config(run_dir: Path) -> None:
    text = (run_dir / "config.toml").read_text()
    (run_dir / "config.toml").write_text(text.replace("lr = 0.005", "lr = 0.001"))


def damage_adapter(run_dir: Path) -> None:
    path = run_dir / "checkpoint" / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def forge_ranks(run_dir: Path) -> None:
    (run_dir / "summary.json").unlink()  # not complete, so that the resume gets as far as the restore
    path = run_dir / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state["client_ranks"]["0"] = 2
    path.write_text(json.dumps(state))


def damage_state(edit):
    """A `prepare_dir` that rewrites `checkpoint/state.json` as `edit(state)` returns it (valid JSON of the
    wrong structure), in a run that is not complete, so that a resume would go on."""

    def prepare_dir(run_dir: Path) -> None:
        (run_dir / "summary.json").unlink()
        path = run_dir / "checkpoint" / "state.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    prepare_dir.__name__ = edit.__name__
    return prepare_dir


def without(key):
    def edit(state):
        del state[key]
        return state

    edit.__name__ = f"without_{key}"
    return edit


def with_value(path: str, value):
    def edit(state):
        *parents, leaf = path.split(".")
        node = state
        for name in parents:
            node = node[int(name)] if isinstance(node, list) else node[name]
        node[int(leaf) if isinstance(node, list) else leaf] = value
        return state

    edit.__name__ = f"{path}={value!r}"[:40]
    return edit


# state.json that parses but has the wrong structure: one line, no traceback, no file changed
DAMAGED_STATES = [
    (lambda state: [], "state.json is damaged: it holds a JSON list, not an object"),
    (lambda state: {"format": 1}, "but state.json names round None: the checkpoint is damaged"),
    (without("server"), "state.json is damaged: server: Field required"),
    (without("rng"), "state.json is damaged: rng: Field required"),
    (without("metrics"), "state.json is damaged: metrics: Field required"),
    (with_value("round", "2"), "but state.json names round '2': the checkpoint is damaged"),
    (with_value("round", 2.0), "state.json is damaged: round: Input should be a valid integer"),
    (with_value("server", []), "state.json is damaged: server"),
    (with_value("server.synced", [1]), "state.json is damaged: server.synced"),
    (with_value("server.version", -1), "state.json is damaged: server.version"),
    (with_value("server.aggregator", {"deltas": []}), "the checkpoint's server state does not fit this run"),
    (with_value("client_ranks", [4, 4, 4]), "state.json is damaged: client_ranks"),
    (with_value("metrics", {}), "state.json is damaged: metrics"),
    (with_value("metrics.0", {"round": 1}), "state.json is damaged: metrics.0.uplink_bytes: Field required"),
    (with_value("metrics.0.accuracy", None), "metrics.0: Value error, an evaluated round without its accu"),
    (with_value("metrics.1.round", 7), "its metrics rows are of rounds [1, 7], not 1 to 2"),
    (with_value("rng", "seeded"), "state.json is damaged: rng"),
    (with_value("rng.python", [3, [1, 2], None]), "its RNG states cannot be restored"),
    (with_value("rng.numpy.1", [1]), "its RNG states cannot be restored"),
    (with_value("rng.torch", "AAAA"), "its RNG states cannot be restored"),
    (with_value("rng.torch", "not base64!"), "its RNG states cannot be restored"),
]


@pytest.mark.parametrize(
    ("prepare_dir", "args", "message"),
    [
        *[(damage_state(edit), [], message) for edit, message in DAMAGED_STATES],
        (None, [], "is complete (2 of 2 rounds); nothing to resume"),
        (
            edit_config,
            [],
            "made with another config than this config.toml (train.lr = 0.005 there, 0.001 here)",
        ),
        (damage_adapter, [], "adapter.safetensors is missing or unreadable, but state.json names round 2"),
        (forge_ranks, [], "the checkpoint does not match this run's client ranks"),
        (None, ["--set", "federation.rounds=1"], "federation.rounds=1 is below the 2 rounds"),
        (None, ["--set", "train.lr=0.1"], "--set may change only federation.rounds (got 'train.lr=0.1')"),
        (None, ["--config", "configs/mrpc.toml"], "it takes no --config, --out or --data-dir"),
    ],
)
def test_a_resume_that_cannot_go_on_says_why_and_changes_nothing(
    finished_run, tmp_path, capsys, prepare_dir, args, message
):
    run_dir = copy_run(finished_run, tmp_path / "run")
    if prepare_dir is not None:
        prepare_dir(run_dir)
    before = files_of(run_dir)
    err = cli_error(capsys, "run", "--resume", str(run_dir), "-q", *args)
    assert message in err, err
    assert files_of(run_dir) == before


def test_resume_of_a_missing_or_foreign_directory(tmp_path, capsys):
    assert "no such run directory" in cli_error(capsys, "run", "--resume", str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("not a run")
    before = files_of(tmp_path)
    assert "not a run directory: it has no config.toml" in cli_error(capsys, "run", "--resume", str(tmp_path))
    assert files_of(tmp_path) == before


def test_a_run_without_a_checkpoint_starts_again_from_round_1(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoint")
    (run_dir / "summary.json").unlink()
    metrics = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(metrics.splitlines()[0] + "\n")  # round 1, never committed
    with pytest.raises(SystemExit) as info:
        main(["run", "--resume", str(run_dir), "-q"])
    assert info.value.code == 0
    assert "done: final accuracy" in capsys.readouterr().out
    assert_same_run(finished_run, run_dir)


def test_resume_extends_a_finished_run(finished_run, tiny_model_dir, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(SystemExit) as info:
        main(["run", "--resume", str(run_dir), "-q", "--set", "federation.rounds=3"])
    assert info.value.code == 0
    assert "rounds = 3" in (run_dir / "config.toml").read_text()  # a later resume sees the new length
    settings = load_settings(run_dir / "config.toml")  # the same config, 3 rounds
    whole = create_run_dir(tmp_path / "whole")
    simulation.run(prepare(settings), whole, progress=False)
    assert_same_run(whole, run_dir)


def test_a_run_checkpointed_by_an_older_hlora_resumes(finished_run, tmp_path, capsys):
    """The checkpoint of an hlora that had no `train.precision` goes on (the setting holds its default),
    and the next checkpoint records the whole config of this hlora."""
    run_dir = copy_run(finished_run, tmp_path / "run")
    path = run_dir / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    stored = state.pop("settings")
    del stored["train"]["precision"]
    state["settings"] = stored
    state["fingerprint"] = checkpoint_of(stored).run["fingerprint"]
    path.write_text(json.dumps(state))
    with pytest.raises(SystemExit) as info:
        main(["run", "--resume", str(run_dir), "-q", "--set", "federation.rounds=3"])
    assert info.value.code == 0
    state = json.loads(path.read_text())
    assert state["round"] == 3 and state["settings"]["train"]["precision"] == "fp32"
    assert state["fingerprint"] == cfg.fingerprint(load_settings(run_dir / "config.toml"))


# --- THE test: SIGKILL mid-round, then hlora run --resume ---------------------------------------------


def hlora_process(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m hlora ARGS` on the code under test, its output in `log`, with this process's number of
    torch threads (a float sum split over other threads may round otherwise)."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(Path(hlora.__file__).parents[1]),
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "hlora", *args], stdout=out, stderr=out, env=env)


def checkpoint_round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError):
        return 0


def test_sigkill_mid_round_then_resume_ends_as_the_run_that_never_stopped(tiny_settings, tmp_path):
    # FLoRA with mixed ranks and two of three clients a round: base deltas, a client that misses rounds,
    # and enough local steps that a round lasts a while.
    settings = configured(tiny_settings, "flora", train={"local_steps": 8})
    config = tmp_path / "config.toml"
    config.write_text(settings_to_toml(settings))
    run_dir = tmp_path / "killed"
    proc = hlora_process(["run", "-c", str(config), "--out", str(run_dir), "-q"], tmp_path / "run.log")
    try:
        deadline = time.monotonic() + 120
        while checkpoint_round(run_dir) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, (tmp_path / "run.log").read_text()
        time.sleep(0.1)  # into round 2
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Killed inside round 2, unless a loaded machine held this process back for a whole round: then a
    # later round, still before the end.
    assert 1 <= checkpoint_round(run_dir) < settings.federation.rounds
    assert not (run_dir / "summary.json").exists()

    # The same command in this process: a second interpreter start would double the test's time, and
    # what a resume restores (RNG states included) does not depend on the process it runs in.
    with pytest.raises(SystemExit) as info:
        main(["run", "--resume", str(run_dir), "-q"])
    assert info.value.code == 0

    simulation.run(prepare(settings), create_run_dir(tmp_path / "whole"), progress=False)
    assert_same_run(tmp_path / "whole", run_dir)


def test_a_run_directory_in_use_by_another_process_is_refused_and_left_alone(tiny_settings, tmp_path):
    settings = configured(tiny_settings, "hlora")
    run_dir = create_run_dir(tmp_path / "run")
    simulation.run(prepare(settings.model_copy(deep=True)), run_dir, progress=False)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    held = lock_run_dir(run_dir)  # what a second process's run holds: an OS lock on another descriptor
    try:
        resumed, ckpt = checkpoint.open_resume(run_dir, ["federation.rounds=4"])
        with pytest.raises(hlora.errors.RunDirError, match="in use by another hlora process"):
            simulation.run(prepare(resumed), run_dir, progress=False, resume=ckpt)
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    finally:
        held.release()
    # let go, the same resume goes on; and a run that ends (or fails) lets go of the folder too
    resumed, ckpt = checkpoint.open_resume(run_dir, ["federation.rounds=4"])
    simulation.run(prepare(resumed), run_dir, progress=False, resume=ckpt)
    assert [row["round"] for row in read_metrics(run_dir)] == [1, 2, 3, 4]
    lock_run_dir(run_dir).release()
