"""`hlora compare` and `hlora report` on the tiny model: the plan of runs, the local reference, the tables
checked against the run directories, skipping, resuming, refusing, and regenerating the report."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout
from scipy import stats

from hlora import simulation
from hlora.aggregation import registry
from hlora.cli.main import main
from hlora.config import load_settings, validate_settings
from hlora.errors import ConfigError, ModelError, RunDirError
from hlora.experiments import compare as cmp
from hlora.experiments import report
from hlora.federation import prepared
from hlora.federation import round as engine
from hlora.federation.prepared import prepare
from hlora.rundir import LOCK_FILE, lock_run_dir, read_metrics

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"

# --- planning, without a model ------------------------------------------------------------------------


def names(specs) -> list[str]:
    return [s.dir_name for s in specs]


def test_mixed_ranks_make_fedit_the_two_fedit_references_once():
    specs = cmp.plan_runs(
        ["hlora", "fedit"], [0], lambda seed: {0: 2, 1: 16, 2: 8}, references=True, local_clients=[0, 1]
    )
    assert names(specs) == [
        "hlora-s0",
        "fedit-r2-s0",
        "fedit-r16-s0",
        "central-s0",
        "local-c0-s0",
        "local-c1-s0",
    ]
    fedit = specs[1]
    assert fedit.reference and fedit.group == "fedit-r2"
    assert "lora.rank=2" in fedit.overrides and "lora.bank_rank=2" in fedit.overrides
    assert specs[-1].group == "local" and "run.client=1" in specs[-1].overrides


def test_without_references_mixed_fedit_still_runs_at_both_ends():
    specs = cmp.plan_runs(["fedit", "ffa"], [0, 1], lambda seed: {0: 2, 1: 4}, references=False)
    assert names(specs) == ["fedit-r2-s0", "fedit-r4-s0", "ffa-s0", "fedit-r2-s1", "fedit-r4-s1", "ffa-s1"]


def test_equal_ranks_fedit_is_a_plain_method_and_its_own_reference():
    specs = cmp.plan_runs(["fedit", "hlora"], [3], lambda seed: {0: 8, 1: 8}, local_clients=[])
    assert names(specs) == ["fedit-s3", "hlora-s3", "central-s3"]
    specs = cmp.plan_runs(["hlora"], [3], lambda seed: {0: 8, 1: 8}, local_clients=[])
    assert names(specs) == ["hlora-s3", "central-s3", "fedit-r8-s3"]


def test_central_overrides_go_to_the_centralised_reference_alone():
    specs = cmp.plan_runs(
        ["hlora"], [0], lambda seed: {0: 2, 1: 4}, local_clients=[0], central_overrides=["train.lr=3e-4"]
    )
    by_name = {s.name: s for s in specs}
    assert by_name["central"].overrides == ("run.mode=centralized", "train.lr=3e-4")
    assert all("train.lr=3e-4" not in s.overrides for s in specs if s.name != "central")


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("run.mode=local", "mode and seed are the comparison's"),
        ("run.seed=3", "mode and seed are the comparison's"),
        ("train.lrr=1e-3", "lrr"),
        ("train.lr=-1", "lr"),
    ],
)
def test_bad_central_overrides_fail_before_anything_runs(config_file, tmp_path, item, message):
    with pytest.raises(ConfigError, match=message):
        cmp.prepare_comparison(
            config_file, [], ["hlora"], [0], tmp_path / "out", central_overrides=[item],
            ranks_of=lambda settings: {0: 2, 1: 4, 2: 4},
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [("hlora,nope", "unknown method 'nope'"), (" , ", "names no method")],
)
def test_bad_methods_are_config_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        cmp.parse_methods(text)


def test_seeds_parse_and_refuse():
    assert cmp.parse_seeds("0, 1,1,2") == [0, 1, 2]
    with pytest.raises(ConfigError, match="integers"):
        cmp.parse_seeds("0,x")
    with pytest.raises(ConfigError, match="--seeds: -1 is not a seed; seeds run from 0 to 4294967295"):
        cmp.parse_seeds("0,-1")
    with pytest.raises(ConfigError, match="--seeds: 4294967296 is not a seed"):
        cmp.parse_seeds("4294967296")


@pytest.mark.parametrize(
    ("overrides", "central", "error", "message"),
    [
        (["run.device='cuda:99'"], [], ConfigError, "run.device: 'cuda:99' asked for"),
        (["run.device=garbage"], [], ConfigError, "run.device: unknown device 'garbage'"),
        (["lora.modules_to_save=['nope']"], [], ConfigError, "lora.modules_to_save: 'nope' names no module"),
        # only the centralised reference, planned after the methods, would fail: still before any trains
        ([], ["data.max_length=512"], ModelError, "data.max_length 512 is above the 128 positions"),
        ([], ["lora.bank_rank=33"], ConfigError, "lora.bank_rank 33 is above min(m, n) = 32"),
    ],
)
def test_settings_a_run_cannot_serve_fail_before_the_first_run_trains(
    config_file, tmp_path, overrides, central, error, message
):
    with pytest.raises(error, match=re.escape(message)):
        cmp.prepare_comparison(
            config_file, overrides, ["hlora"], [0], tmp_path / "out", central_overrides=central,
            ranks_of=lambda settings: {0: 2, 1: 4, 2: 4},
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_compare_with_a_negative_seed_is_one_line_exit_2(config_file, tmp_path):
    code, _, stderr = hlora("compare", str(config_file), "--seeds=-1", "--out", str(tmp_path / "out"))
    assert code == 2 and stderr.strip() == (
        "hlora: error: --seeds: -1 is not a seed; seeds run from 0 to 4294967295"
    ), stderr
    assert not (tmp_path / "out").exists()


def test_mean_rows_average_clients_per_rank():
    run = [
        {
            "round": 1,
            "accuracy": a,
            "tier_accuracy": {str(r): a},
            "tier_step_s": {str(r): s},
            "tier_peak_bytes": {str(r): p},
            "wall_s": 1.0,
        }
        for a, r, s, p in ((0.5, 2, 0.1, 10), (0.7, 2, 0.3, 30), (0.9, 4, 0.2, 20))
    ]
    (row,) = report.mean_rows([[r] for r in run])
    assert row["accuracy"] == pytest.approx(0.7)
    assert row["tier_accuracy"] == pytest.approx({"2": 0.6, "4": 0.9})
    assert row["tier_step_s"] == pytest.approx({"2": 0.2, "4": 0.2})
    assert row["tier_peak_bytes"] == {"2": 30, "4": 20}
    assert row["wall_s"] == 3.0 and row["uplink_bytes"] == 0


def test_paired_p_is_the_two_sided_paired_t_test_over_seeds():
    diffs = [0.01, 0.035, 0.02]
    assert report.paired_p(diffs) == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    assert report.paired_p([0.9, 0.1, -0.7]) > 0.5 > report.paired_p([0.03, 0.031, 0.029])
    assert report.paired_p([0.02]) is None and report.paired_p([0.02, 0.02]) is None


def test_provenance_counts_the_runs_that_shared_their_cores():
    env = {"commit": "abc", "command": "hlora compare x.toml", "torch_threads": 2, "cpu_count": 2}
    lines = report.provenance_lines(
        [{**env, "load_avg": [2.1, 2.3, 2.0]}, {**env, "load_avg": [3.0, 2.9, 2.4]}, None]
    )
    text = "\n".join(lines)
    assert "- abc (2 runs)" in text and "`hlora compare x.toml` (2 runs)" in text
    assert "before each run ended: 2.30 to 2.90. 1 of 2 runs ended on cores busier" in text
    assert "1 run carries no record" in text
    assert "Load average" not in "\n".join(report.provenance_lines([env]))  # not recorded: nothing said


# --- the local reference ------------------------------------------------------------------------------


def test_local_mode_needs_a_client_id(tiny_settings):
    raw = tiny_settings.model_dump()
    raw["run"]["mode"] = "local"
    with pytest.raises(ConfigError, match="needs run.client"):
        validate_settings(raw)
    raw["run"]["client"] = 3
    with pytest.raises(ConfigError, match=r"run.client \(3\) is not a client id"):
        validate_settings(raw)


@pytest.mark.parametrize(
    "lora", [{"rank_policy": "tiers", "tiers": [1, 2, 4]}, {"rank_policy": "data_size", "rank": 4}]
)
def test_client_plan_is_the_one_prepare_gives(tiny_settings, lora):
    """The ranks and the partition rows (sizes, label counts) read without the model are the run's."""
    raw = tiny_settings.model_dump()
    raw["lora"].update(lora)
    raw["federation"].update(method="hlora", alpha=0.5)
    for seed in (0, 1):
        raw["run"]["seed"] = seed
        settings = validate_settings(raw)
        exp = prepare(settings)
        table, ranks = cmp.client_plan(settings)
        assert ranks == cmp.client_ranks(settings) == exp.client_ranks
        assert [{**row, "rank": ranks[row["client"]]} for row in table] == exp.partition_rows
        assert len({row["size"] for row in table}) > 1  # a skewed split, not a trivially equal one


def test_a_folder_left_holding_only_a_dead_runs_lock_is_trained_into(tiny_settings, tmp_path, monkeypatch):
    """A run killed between taking its directory's lock and writing its config leaves only `.lock`: the
    next comparison starts that run afresh there, unless a live process holds the lock."""
    run_dir = tmp_path / "hlora-s0"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).touch()
    assert cmp.run_state(run_dir, tiny_settings) == "new"
    held = lock_run_dir(run_dir)
    monkeypatch.setattr(prepared, "prepare", lambda settings: "prepared")
    monkeypatch.setattr(simulation, "run", lambda exp, path, progress: {"trained_in": sorted(path.iterdir())})
    with pytest.raises(RunDirError, match="in use by another hlora process"):
        cmp.execute(run_dir, tiny_settings, "new")
    assert run_dir.is_dir()  # the live run's folder is left alone
    held.release()
    assert cmp.execute(run_dir, tiny_settings, "new") == {"trained_in": []}  # a new, empty directory
    (run_dir / "notes.txt").write_text("someone's file")
    with pytest.raises(RunDirError, match="not a run directory"):
        cmp.run_state(run_dir, tiny_settings)


# --- end to end on the tiny model ---------------------------------------------------------------------


def hlora(*args: str) -> tuple[int, str, str]:
    """`hlora ARGS` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


CONFIG = """
[run]
seed = 0
device = "cpu"

[data]
task = "mrpc"
data_dir = "{glue}"
max_length = 48
max_train_samples = 48
max_eval_samples = 32

[model]
name_or_path = "{model}"

[lora]
rank_policy = "tiers"
tiers = [2, 4]

[federation]
method = "hlora"
num_clients = 3
clients_per_round = 2
rounds = 2
alpha = 1.0
min_client_size = 4

[train]
lr = 3e-2
batch_size = 8
local_steps = 2

[eval]
batch_size = 16
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_model_dir, glue_dir) -> Path:
    path = tmp_path_factory.mktemp("compare-config") / "tiny.toml"
    path.write_text(CONFIG.format(glue=glue_dir, model=tiny_model_dir), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory, config_file) -> tuple[Path, str]:
    """hlora and zeropad, seeds 0 and 1, 2 rounds, with the references (local: clients 0 and 1; the
    centralised one at its own learning rate)."""
    out = tmp_path_factory.mktemp("compare") / "results"
    code, stdout, stderr = hlora(
        "compare", str(config_file), "--methods", "hlora,zeropad", "--seeds", "0,1",
        "--out", str(out), "--local-clients", "2", "--central-set", "train.lr=1e-2", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    return out, stdout


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return {row["group"]: row for row in csv.DictReader(f)}


def test_compare_runs_every_method_and_reference_per_seed(compared):
    out, stdout = compared
    runs = sorted(p.name for p in (out / "runs").iterdir())
    per_seed = ["central", "fedit-r2", "fedit-r4", "hlora", "local-c0", "local-c1", "zeropad"]
    assert runs == sorted(f"{name}-s{seed}" for name in per_seed for seed in (0, 1))
    assert "14 runs in" in stdout and "14 to train" in stdout
    assert stdout.count(": running") == 14 and stdout.count(": done, final accuracy") == 14
    # identical partitions and rank tiers across methods of a seed, another draw for another seed
    partition = {p: (out / "runs" / p / "partition.csv").read_text() for p in runs}
    assert partition["hlora-s0"] == partition["zeropad-s0"] != partition["hlora-s1"]
    clients = {p: [r["clients"] for r in read_metrics(out / "runs" / p)] for p in runs}
    assert clients["hlora-s0"] == clients["zeropad-s0"] == clients["fedit-r2-s0"]  # each round's draw
    central = load_settings(out / "runs" / "central-s0" / "config.toml")
    assert central.run.mode == "centralized" and central.federation.num_clients == 1
    assert central.lora.rank == 4  # the bank rank
    assert central.train.lr == 1e-2  # --central-set, for it alone
    assert load_settings(out / "runs" / "hlora-s0" / "config.toml").train.lr == 3e-2
    fedit = load_settings(out / "runs" / "fedit-r2-s1" / "config.toml")
    assert (fedit.federation.method, fedit.lora.rank_policy, fedit.lora.rank) == ("fedit", "fixed", 2)
    assert fedit.run.seed == 1


def test_local_reference_is_one_client_of_the_partition_alone(compared):
    out, _ = compared
    fed = (out / "runs" / "hlora-s0" / "partition.csv").read_text().splitlines()
    alone = (out / "runs" / "local-c1-s0" / "partition.csv").read_text().splitlines()
    assert alone[0] == fed[0] and alone[1] == fed[2]  # header, then client 1's size, rank and labels
    rows = read_metrics(out / "runs" / "local-c1-s0")
    assert all(row["clients"] == [0] for row in rows)
    settings = load_settings(out / "runs" / "local-c1-s0" / "config.toml")
    assert (settings.run.mode, settings.run.client, settings.federation.method) == ("local", 1, "fedit")


def test_summary_csv_agrees_with_the_run_directories(compared):
    out, _ = compared
    table = read_csv(out / "summary.csv")
    assert set(table) == {"hlora", "zeropad", "central", "fedit-r2", "fedit-r4", "local"}
    for group in ("hlora", "central"):
        runs = [read_metrics(out / "runs" / f"{group}-s{seed}") for seed in (0, 1)]
        final = [rows[-1]["accuracy"] for rows in runs]
        best = [max(r["accuracy"] for r in rows) for rows in runs]
        row = table[group]
        assert row["seeds"] == "2"
        assert float(row["final_accuracy_mean"]) == pytest.approx(statistics.mean(final))
        assert float(row["final_accuracy_std"]) == pytest.approx(statistics.stdev(final))
        assert float(row["best_accuracy_mean"]) == pytest.approx(statistics.mean(best))
        assert float(row["final_f1_mean"]) == pytest.approx(statistics.mean(r[-1]["f1"] for r in runs))
    hlora_runs = [read_metrics(out / "runs" / f"hlora-s{seed}") for seed in (0, 1)]
    row = table["hlora"]
    up = [sum(r["uplink_bytes"] for r in rows) / 1e6 for rows in hlora_runs]
    assert float(row["uplink_mb_mean"]) == pytest.approx(statistics.mean(up))
    agg = [sum(r["aggregate_s"] for r in rows) for rows in hlora_runs]
    assert float(row["aggregate_s_mean"]) == pytest.approx(statistics.mean(agg))
    for rank in ("2", "4"):
        tier = [rows[-1]["tier_accuracy"][rank] for rows in hlora_runs]
        assert float(row[f"tier{rank}_final_accuracy_mean"]) == pytest.approx(statistics.mean(tier))
        peak = max(
            r["tier_peak_bytes"][rank] for rows in hlora_runs for r in rows if rank in r["tier_peak_bytes"]
        )
        assert float(row[f"tier{rank}_peak_mib"]) == pytest.approx(peak / 2**20)
        state = max(
            r["tier_state_bytes"][rank] for rows in hlora_runs for r in rows if rank in r["tier_state_bytes"]
        )
        assert float(row[f"tier{rank}_state_mib"]) == pytest.approx(state / 2**20)
    assert float(row["tier2_state_mib"]) < float(row["tier4_state_mib"])  # the rank's own share
    # the centralised and local runs exchange nothing: no traffic, no aggregation time
    assert table["central"]["uplink_mb_mean"] == "" and table["local"]["aggregate_s_mean"] == ""
    # the local reference: per seed the mean over its clients, then mean over seeds
    local = [
        statistics.mean(read_metrics(out / "runs" / f"local-c{c}-s{seed}")[-1]["accuracy"] for c in (0, 1))
        for seed in (0, 1)
    ]
    assert float(table["local"]["final_accuracy_mean"]) == pytest.approx(statistics.mean(local))
    assert table["local"]["clients"] == "2"
    # the target: 0.95 x the centralised mean final accuracy, and the first round reaching it
    target = float(table["hlora"]["target_accuracy"])
    assert target == pytest.approx(0.95 * float(table["central"]["final_accuracy_mean"]))
    reached = [next((r["round"] for r in rows if r["accuracy"] >= target), None) for rows in hlora_runs]
    assert table["hlora"]["reached_target"] == str(sum(x is not None for x in reached))
    walls = [sum(r["wall_s"] for r in rows[:x]) for rows, x in zip(hlora_runs, reached, strict=True) if x]
    if walls:
        assert float(table["hlora"]["wall_to_target_s_mean"]) == pytest.approx(statistics.mean(walls))


def test_paired_table_is_hlora_minus_each_other_run_of_the_same_seed(compared):
    out, _ = compared
    paired = read_csv(out / "paired.csv")
    assert sorted(paired) == sorted(["zeropad", "central", "fedit-r2", "fedit-r4", "local"])

    def rows(name: str, seed: int) -> list[dict]:
        return read_metrics(out / "runs" / f"{name}-s{seed}")

    row = paired["zeropad"]
    diffs = [rows("hlora", s)[-1]["accuracy"] - rows("zeropad", s)[-1]["accuracy"] for s in (0, 1)]
    assert row["seeds"] == "2"
    assert float(row["final_accuracy_diff_mean"]) == pytest.approx(statistics.mean(diffs))
    assert float(row["final_accuracy_diff_std"]) == pytest.approx(statistics.stdev(diffs))
    assert int(row["ahead"]) == sum(d > 0 for d in diffs) and int(row["behind"]) == sum(d < 0 for d in diffs)
    finals = [[rows(name, s)[-1]["accuracy"] for s in (0, 1)] for name in ("hlora", "zeropad")]
    if diffs[0] == diffs[1]:  # nothing varies: no test
        assert row["final_accuracy_p"] == ""
    else:
        assert float(row["final_accuracy_p"]) == pytest.approx(stats.ttest_rel(*finals).pvalue)
    curve = [
        statistics.mean(r["accuracy"] for r in rows("hlora", s))
        - statistics.mean(r["accuracy"] for r in rows("zeropad", s))
        for s in (0, 1)
    ]
    assert float(row["mean_accuracy_diff_mean"]) == pytest.approx(statistics.mean(curve))
    def mb(name: str, seed: int) -> float:
        return sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows(name, seed))

    ratio = statistics.mean(mb("zeropad", s) / mb("hlora", s) for s in (0, 1))
    assert float(row["traffic_ratio"]) == pytest.approx(ratio)

    def cpu(name: str, seed: int) -> float:  # the runs record it: the median round's CPU seconds
        return statistics.median(r["aggregate_cpu_s"] for r in rows(name, seed))

    ratio = statistics.mean(cpu("zeropad", s) / cpu("hlora", s) for s in (0, 1))
    assert float(row["aggregate_ratio"]) == pytest.approx(ratio, rel=1e-3)
    # the references that exchange nothing have no traffic or aggregation multiple
    assert paired["central"]["traffic_ratio"] == "" and paired["local"]["aggregate_ratio"] == ""
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "## hlora against each method and reference, seed by seed" in text
    assert f"| zeropad | 2 | {statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} |" in text


def test_the_verdicts_are_read_off_the_paired_tables_for_the_methods_alone(compared):
    out, _ = compared
    paired = read_csv(out / report.PAIRED_CSV)
    with (out / report.VERDICTS_CSV).open(encoding="utf-8") as f:
        found = {(row["group"], row["claim"]): row for row in csv.DictReader(f)}
    assert {group for group, _ in found} == {"zeropad"}  # the references are no rivals
    final = found[("zeropad", "ends more accurate")]
    diff = float(paired["zeropad"]["final_accuracy_diff_mean"])
    assert final["seeds"] == "2" and float(final["effect"]) == pytest.approx(100 * diff)
    assert final["favours"] == ("hlora" if diff > 0 else "zeropad" if diff < 0 else "")
    p = paired["zeropad"]["final_accuracy_p"]
    assert final["p"] == p and final["separated"] == str(diff != 0 and (p == "" or float(p) < 0.05))
    assert float(found[("zeropad", "sends less")]["effect"]) == pytest.approx(
        float(paired["zeropad"]["traffic_ratio"])
    )
    assert found[("zeropad", "lowest tier ends more accurate")]["rank"] == "2"
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "## Verdicts: hlora against each method" in text
    assert f"| zeropad | 2 | {final['text']} |" in text


def test_paired_tier_table_is_hlora_minus_the_others_adapter_of_each_rank(compared):
    out, _ = compared
    with (out / report.PAIRED_TIERS_CSV).open(encoding="utf-8") as f:
        paired = {(row["group"], int(row["rank"])): row for row in csv.DictReader(f)}

    def scored(name: str, seed: int) -> list[dict]:
        return [r for r in read_metrics(out / "runs" / f"{name}-s{seed}") if "accuracy" in r]

    def tier(name: str, seed: int, rank: int) -> list[float]:
        """The tier's scores by round; a run of one rank: its global adapter's."""
        return [r["tier_accuracy"][str(rank)] if "tier_accuracy" in r else r["accuracy"]
                for r in scored(name, seed)]

    assert all("tier_accuracy" in r for r in scored("hlora", 0))  # the tiers are scored: a real test
    for rank in (2, 4):
        row = paired[("zeropad", rank)]
        finals = [tier("hlora", s, rank)[-1] - tier("zeropad", s, rank)[-1] for s in (0, 1)]
        means = [statistics.mean(tier("hlora", s, rank)) - statistics.mean(tier("zeropad", s, rank))
                 for s in (0, 1)]
        assert row["seeds"] == "2" and int(row["rounds"]) == len(tier("hlora", 0, rank))
        assert float(row["final_diff_mean"]) == pytest.approx(statistics.mean(finals))
        assert float(row["final_diff_std"]) == pytest.approx(statistics.stdev(finals))
        assert float(row["mean_diff_mean"]) == pytest.approx(statistics.mean(means))
        assert int(row["ahead"]) == sum(d > 0 for d in finals)
        assert int(row["behind"]) == sum(d < 0 for d in finals)
    # a fixed-rank reference pairs at its own rank alone, with its global adapter
    assert ("fedit-r2", 2) in paired and ("fedit-r2", 4) not in paired and ("fedit-r4", 2) not in paired
    finals = [tier("hlora", s, 2)[-1] - scored("fedit-r2", s)[-1]["accuracy"] for s in (0, 1)]
    assert float(paired[("fedit-r2", 2)]["final_diff_mean"]) == pytest.approx(statistics.mean(finals))
    assert ("hlora", 2) not in paired  # the subject is not paired with itself
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "## hlora's rank tiers against each method's, seed by seed" in text
    mean, std = statistics.mean(finals), statistics.stdev(finals)
    assert f"| FedIT r=2 (ref.) | 2 | 2 | {mean:+.4f} ± {std:.4f}" in text


def test_the_time_table_splits_each_methods_rounds_into_their_parts(compared):
    out, _ = compared
    times = report.time_table(report.load_results(out).runs)
    # the runs that federate, not the centralised and local references
    assert list(times.index) == ["hlora", "zeropad", "fedit-r2", "fedit-r4"]
    assert "secure stages" not in times.columns  # no run had any: no column

    def shares(seed: int) -> dict[str, float]:
        rows = read_metrics(out / "runs" / f"hlora-s{seed}")
        total = sum(r["wall_s"] + r["checkpoint_s"] for r in rows)
        return {
            "training": sum(r["train_s"] for r in rows) / total,
            "evaluation": sum(r.get("eval_s", 0) + r.get("tier_eval_s", 0) for r in rows) / total,
            "checkpoint": sum(r["checkpoint_s"] for r in rows) / total,
            "round_s": total / len(rows),
        }

    for key in ("training", "evaluation", "checkpoint", "round_s"):
        assert times.at["hlora", key] == pytest.approx(statistics.mean(shares(s)[key] for s in (0, 1)))
    # a round's wall time is its parts, each rounded to 0.1 ms in the row (so up to 0.05 ms off apiece)
    parts = ("train_s", "aggregate_s", "instruments_s", "eval_s", "tier_eval_s")
    for seed in (0, 1):
        for r in read_metrics(out / "runs" / f"hlora-s{seed}"):
            assert abs(r["wall_s"] - sum(r.get(k, 0) for k in parts)) <= 3e-4, r["round"]
    # and the table's shares are those parts with the checkpoint, over the whole round
    covered = [
        sum(r.get(k, 0) for r in rows for k in (*parts, "checkpoint_s"))
        / sum(r["wall_s"] + r["checkpoint_s"] for r in rows)
        for rows in (read_metrics(out / "runs" / f"hlora-s{seed}") for seed in (0, 1))
    ]
    assert times.drop(columns=["round_s", report.BUSY]).loc["hlora"].sum() == pytest.approx(
        statistics.mean(covered)
    )
    # the CPU the process spent per wall second of its rounds: one process, every thread
    busy = [sum(r["cpu_s"] for r in rows) / sum(r["wall_s"] for r in rows)
            for rows in (read_metrics(out / "runs" / f"hlora-s{seed}") for seed in (0, 1))]  # fmt: skip
    assert times.at["hlora", report.BUSY] == pytest.approx(statistics.mean(busy))
    assert 0 < times.at["hlora", report.BUSY] <= os.cpu_count() + 0.5
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "## Where a round's time goes" in text
    hlora = times.loc["hlora"]
    row = f"| hlora | {hlora['round_s']:.1f} | {hlora[report.BUSY]:.2f} | {100 * hlora['training']:.1f}% |"
    assert row in text


CHARTS = (report.PLOT_ROUNDS, report.PLOT_SEEDS, report.PLOT_TRAFFIC, report.PLOT_TIERS, report.PLOT_BIAS,
          report.PLOT_BLOCKS, report.PLOT_FEATURES)  # fmt: skip


def test_summary_md_and_charts_are_written(compared):
    out, _ = compared
    text = (out / "summary.md").read_text(encoding="utf-8")
    for name in (
        "| hlora |",
        "| zeropad |",
        "centralised (upper ref.)",
        "FedIT r=2 (ref.)",
        "FedIT r=4 (ref.)",
    ):
        assert name in text
    assert "local alone (lower ref.)" in text and "mean over 2 clients" in text
    assert "0.95 x the centralised reference's mean final accuracy" in text
    assert "The centralised reference has settings of its own: train.lr = 0.01 (the methods: 0.03)." in text
    # how the numbers were made: every run records its command, code and hardware
    env = json.loads((out / "runs" / "hlora-s0" / "summary.json").read_text())["environment"]
    assert env["command"].startswith("hlora compare ") and "--seeds 0,1" in env["command"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["cpu_count"] >= 1
    assert "## How these runs were made" in text and f"`{env['command']}` (14 runs)" in text
    assert f"- {env['commit'] or 'not a git checkout'} (14 runs)" in text
    for name in CHARTS:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_the_instruments_frame_holds_every_method_round_and_block(compared):
    """What the mechanism charts draw: per method, seed and round, the bias and each block's energy share
    (the tiers of the compared config: blocks 0-2, 2-4 and above), shares summing to 1; no reference."""
    runs = report.load_results(compared[0]).runs
    frame = report.instrument_frame(runs)
    assert set(frame["group"]) == {"hlora", "zeropad"} and set(frame["seed"]) == {0, 1}
    blocks = [c for c in frame.columns if c.startswith("block ")]
    assert blocks[:2] == ["block 0-2", "block 2-4"]
    assert frame[blocks].fillna(0).sum(axis=1).sub(1).abs().max() < 1e-6
    assert (frame["rel_error"] >= 0).all()
    hlora_rounds = sorted(frame.loc[(frame["group"] == "hlora") & (frame["seed"] == 0), "round"])
    assert hlora_rounds == [r["round"] for r in next(r for r in runs if r.group == "hlora").rows]


@pytest.fixture
def results_copy(compared, tmp_path) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(compared[0], copy)
    return copy


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained, but every run was complete")

    monkeypatch.setattr(prepared, "prepare", refuse)


def test_a_second_compare_skips_every_complete_run(results_copy, config_file, no_training):
    stamps = {p: p.stat().st_mtime_ns for p in results_copy.glob("runs/*/metrics.jsonl")}
    code, stdout, stderr = hlora(
        "compare", str(config_file), "--methods", "hlora,zeropad", "--seeds", "0,1",
        "--out", str(results_copy), "--local-clients", "2", "--central-set", "train.lr=1e-2", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    assert "0 to train" in stdout and stdout.count("complete, skipped") == 14
    assert stamps == {p: p.stat().st_mtime_ns for p in results_copy.glob("runs/*/metrics.jsonl")}


def test_a_centralised_reference_of_another_learning_rate_is_refused(results_copy, config_file, no_training):
    code, stdout, stderr = hlora(
        "compare", str(config_file), "--methods", "hlora", "--out", str(results_copy), "-q",
    )  # fmt: skip
    assert code == 2 and stderr.count("\n") == 1
    assert "central-s0 holds a run with train.lr = 0.01, this comparison asks for 0.03" in stderr


def test_a_finished_run_of_another_config_is_refused_in_one_line(results_copy, config_file, no_training):
    code, stdout, stderr = hlora(
        "compare", str(config_file), "--methods", "hlora", "--out", str(results_copy), "-q",
        "--set", "train.lr=0.1",
    )  # fmt: skip
    assert code == 2
    assert (
        stderr.count("\n") == 1
        and "train.lr = 0.03, this comparison asks for 0.1" in stderr
        and "move it away" in stderr
    )
    assert "runs in" not in stdout  # refused before anything ran


def test_report_regenerates_tables_and_charts(results_copy, no_training):
    before = (results_copy / "summary.csv").read_text()
    for name in ("summary.md", "summary.csv", *CHARTS):
        (results_copy / name).unlink()
    code, stdout, stderr = hlora("report", str(results_copy))
    assert code == 0, stderr
    assert (results_copy / "summary.csv").read_text() == before
    assert all((results_copy / name).is_file() for name in CHARTS) and "summary.md" in stdout
    code, _, stderr = hlora("compare", "unused.toml", "--report-only", "--out", str(results_copy),
                            "--target-accuracy", "0.7")  # fmt: skip
    assert code == 0, stderr
    assert (
        "Target accuracy 0.7000 (given with --target-accuracy)" in (results_copy / "summary.md").read_text()
    )
    # a target that answering the majority class reaches is flagged as one; one above it is not
    for target, flagged in (("0.05", True), ("0.999", False)):
        code, _, stderr = hlora("report", str(results_copy), "--target-accuracy", target)
        assert code == 0, stderr
        text = (results_copy / "summary.md").read_text()
        assert ("at or below the majority class" in text) is flagged, text[:600]


def test_reports_of_one_folder_are_written_one_at_a_time(results_copy, monkeypatch):
    """Two comparisons of one results folder that end together (one method or seed each, side by side,
    as scripts/paper_regime.py runs them) both write the report: each file is written while the report
    lock is held, so the second waits instead of renaming the first's files away mid-write (before the
    lock: FileNotFoundError on `.summary.md.tmp`)."""
    real = report.write_text_atomic
    written_unlocked = []

    def probing(path, data, durable=False):
        probe = FileLock(results_copy / report.REPORT_LOCK, timeout=0)  # its own descriptor: flock refuses
        try:
            probe.acquire()
            probe.release()
            written_unlocked.append(path.name)
        except Timeout:
            pass
        real(path, data, durable)

    monkeypatch.setattr(report, "write_text_atomic", probing)
    before = (results_copy / "summary.md").read_text()
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(report.write_report, [results_copy] * 2)
    assert written_unlocked == [] and first == second and (results_copy / report.SUMMARY_CSV) in first
    assert (results_copy / "summary.md").read_text() == before


def test_the_report_shows_the_epsilon_of_private_runs_and_no_column_without(results_copy):
    assert "epsilon" not in (results_copy / "summary.csv").read_text()
    for seed, eps in ((0, 3.5), (1, 4.25)):  # as a [privacy] run records it in every row
        path = results_copy / "runs" / f"zeropad-s{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["privacy"] = {"epsilon": eps, "delta": 1e-3, "noise_multiplier": 1.0, "clip": 1.0}
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report.write_report(results_copy)
    table = read_csv(results_copy / "summary.csv")
    assert table["zeropad"]["epsilon"] == "4.25" and table["hlora"]["epsilon"] == ""  # the largest seed's
    lines = (results_copy / "summary.md").read_text().splitlines()
    assert next(line for line in lines if line.startswith("| method | seeds |")).endswith("| epsilon |")


def test_without_methods_compare_runs_those_the_config_admits(config_file):
    admitted, refused = cmp.admitted_methods(config_file, ["privacy.clip=1.0"])
    assert admitted == [m for m in registry.ordered() if registry.get(m).private_space is not None]
    assert "hlora" in admitted and "zeropad" in admitted and "flora" in refused
    assert "[privacy] with federation.method 'flora'" in refused["flora"]
    assert cmp.admitted_methods(config_file, [])[0] == registry.ordered()


def test_report_leaves_out_incomplete_runs_and_refuses_an_empty_folder(results_copy, tmp_path):
    (results_copy / "runs" / "zeropad-s1" / "summary.json").unlink()
    report.write_report(results_copy)
    assert read_csv(results_copy / "summary.csv")["zeropad"]["seeds"] == "1"
    assert "Not complete, left out: zeropad-s1." in (results_copy / "summary.md").read_text()
    with pytest.raises(RunDirError, match="no complete run"):
        report.write_report(tmp_path / "nothing")


def test_a_stopped_run_resumes_to_the_run_that_never_stopped(compared, config_file, tmp_path, monkeypatch):
    """A comparison killed in round 2 of its only run; the next invocation resumes it from round 1's
    checkpoint and ends where the uninterrupted run of the same config ended."""
    out = tmp_path / "results"
    args = ("compare", str(config_file), "--methods", "hlora", "--out", str(out), "--no-references", "-q")
    real_save = engine.save_checkpoint

    def killed_in_round_2(run_dir, exp, rnd, metrics):
        if rnd == 2:
            raise KeyboardInterrupt
        real_save(run_dir, exp, rnd, metrics)

    monkeypatch.setattr(engine, "save_checkpoint", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        cmp.run_comparison(
            cmp.prepare_comparison(config_file, [], ["hlora"], [0], out, references=False), lambda line: None
        )
    run_dir = out / "runs" / "hlora-s0"
    assert not (run_dir / "summary.json").exists()
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    code, stdout, stderr = hlora(*args)
    assert code == 0, stderr
    assert "hlora seed 0" in stdout and ": resuming" in stdout
    resumed = read_metrics(run_dir)
    never_stopped = read_metrics(compared[0] / "runs" / "hlora-s0")
    assert [r["accuracy"] for r in resumed] == [r["accuracy"] for r in never_stopped]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in never_stopped]
    assert (out / "summary.md").is_file()


def test_more_rounds_extend_complete_runs(results_copy, config_file):
    code, stdout, stderr = hlora(
        "compare", str(config_file), "--methods", "zeropad", "--seeds", "1", "--no-references",
        "--out", str(results_copy), "-q", "--set", "federation.rounds=3",
    )  # fmt: skip
    assert code == 0, stderr
    assert ": resuming" in stdout
    rows = read_metrics(results_copy / "runs" / "zeropad-s1")
    assert [r["round"] for r in rows] == [1, 2, 3]


def test_a_committed_run_record_is_skipped_but_not_extended(results_copy, config_file, no_training):
    """Git keeps a run's config, metrics and summary, not its checkpoint: what another machine sees."""
    for run_dir in (results_copy / "runs").iterdir():
        shutil.rmtree(run_dir / "checkpoint")
    args = ["compare", str(config_file), "--methods", "hlora,zeropad", "--seeds", "0,1"]
    args += ["--local-clients", "2", "--central-set", "train.lr=1e-2"]
    code, stdout, stderr = hlora(*args, "--out", str(results_copy), "-q")
    assert code == 0, stderr
    assert stdout.count("complete, skipped") == 14
    code, stdout, stderr = hlora(*args, "--out", str(results_copy), "-q", "--set", "federation.rounds=3")
    assert code == 2 and "without its checkpoint" in stderr and "cannot be extended to 3" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_bad_method_is_one_line_exit_2_and_nothing_written(config_file, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hlora", "compare", str(config_file), "--methods", "hlora,nope",
         "--out", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown method 'nope'" in proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_experiment_configs_load_and_fill_every_tier(path, glue_dir):
    settings = load_settings(path, [f"data.data_dir='{glue_dir}'"])
    assert (
        settings.run.mode == "federated"
        and settings.federation.clients_per_round < settings.federation.num_clients
    )
    for seed in (0, 1, 2):
        ranks = cmp.client_ranks(
            settings.model_copy(update={"run": settings.run.model_copy(update={"seed": seed})})
        )
        if settings.lora.rank_policy == "tiers":
            assert sorted(set(ranks.values())) == sorted(settings.lora.tiers)
        else:  # ranks from data size: 1 .. rank, the largest client at rank, and many in between
            assert settings.lora.rank_policy == "data_size"
            assert min(ranks.values()) >= 1 and max(ranks.values()) == settings.lora.rank
            assert len(set(ranks.values())) >= 8
