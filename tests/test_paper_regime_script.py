"""scripts/paper_regime.py: its queue holds every run the paper-regime issue asks for, each once, and
`collect` copies finished run records (and nothing else) into a checkout without overwriting any, and
`rows` prints BENCHMARKS.md's rows from the committed records, and `status` says where each entry stands."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from hlora.aggregation import registry
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
A5 = "configs/experiments/mrpc-paper-a5.toml"


@pytest.fixture(scope="module")
def script():
    return load_script("paper_regime")


def test_the_queue_holds_every_rule_at_three_seeds_and_the_references_controls_and_qqp(script):
    entries = script.queue()
    assert len(set(entries)) == len(entries)  # nothing twice
    for entry in entries:
        assert (REPO / entry[0]).is_file() and entry[1] == "--methods" and entry[3] == "--seeds"
    on_a5 = Counter((e[2], e[4]) for e in entries if e[0] == A5)
    heterogeneous = [m for m in registry.ordered() if not registry.get(m).equal_ranks]
    assert {(m, s) for m in heterogeneous for s in "012"} <= set(on_a5)  # every rule of mixed ranks
    references = [e for e in entries if e[0] == A5 and "--no-references" not in e]
    assert [(e[2], e[4]) for e in references] == [("fedit", "0")]
    others = {(Path(e[0]).stem, e[2]) for e in entries if e[0] != A5}
    for config in ("mrpc-paper-iid", "mrpc-paper-datasize", "qqp-paper"):
        assert {(config, "hlora"), (config, "zeropad")} <= others
    assert script.QQP_RULE in script.NEW_RULES and ("qqp-paper", script.QQP_RULE) in others
    # what the verdicts need first comes first: seed 0 of every rule before any seed 1
    assert [(e[0], e[4]) for e in entries[: len(heterogeneous)]] == [(A5, "0")] * len(heterogeneous)


def test_collect_copies_the_records_of_finished_runs_once_and_rebuilds_the_report(script, tmp_path):
    committed = REPO / "results/mrpc-paper-a5/runs/ffa-s0"
    source, into = tmp_path / "worktree", tmp_path / "checkout"
    done = source / "results/mrpc-paper-a5/runs/ffa-s0"
    shutil.copytree(committed, done)
    (done / "checkpoint").mkdir()
    (done / "checkpoint" / "state.json").write_text("{}")  # never committed
    running = source / "results/mrpc-paper-a5/runs/hlora-s1"
    running.mkdir()
    (running / "metrics.jsonl").write_text("")  # no summary.json: not finished
    assert script.collect(source, into) == [into / "results/mrpc-paper-a5/runs/ffa-s0"]
    target = into / "results/mrpc-paper-a5/runs/ffa-s0"
    assert sorted(p.name for p in target.iterdir()) == sorted(script.RECORD)
    assert (target / "metrics.jsonl").read_bytes() == (committed / "metrics.jsonl").read_bytes()
    assert (into / "results/mrpc-paper-a5/summary.md").is_file()  # the report rebuilt
    assert not (into / "results/mrpc-paper-a5/runs/hlora-s1").exists()
    # a run already in the checkout is left as it is
    (target / "summary.json").write_text('{"kept": true}')
    assert script.collect(source, into) == []
    assert (target / "summary.json").read_text() == '{"kept": true}'


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_regenerate_the_benchmarks_tables_from_the_committed_runs(script, capsys, monkeypatch, seed):
    benchmarks = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    folder = REPO / "results/mrpc-paper-a5/runs"
    runs = [folder / f"{m}-s{seed}" for m in registry.names() if (folder / f"{m}-s{seed}").is_dir()]
    monkeypatch.setattr(sys, "argv", ["paper_regime.py", "rows", *map(str, runs)])
    script.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == script.ROWS_HEADER and out[0] in benchmarks
    table = [line for line in out[2:] if line.startswith("| ")]
    names = [line.split(" | ")[0].lstrip("| ") for line in table]
    ran = [m for m in registry.ordered() if (REPO / f"results/mrpc-paper-a5/runs/{m}-s{seed}").is_dir()]
    assert names == [script.NAMES[m] for m in ran] and len(names) >= 2  # in the registry's order
    for line in table:  # the rows BENCHMARKS.md gives for the seed, figure for figure
        assert line in benchmarks.splitlines(), line
    dead = "every dev row one class in"
    if seed != 1:  # HLoRA and zero-padding stay alive at seeds 0 and 2: no round gives every row one class
        assert not any(line.startswith((f"HLoRA, seed {seed}", f"zero-padding, seed {seed}")) for line in out)
        return
    assert f"HLoRA, seed 1: {dead} 9 of 10 evaluated rounds, from round 20 to the end" in out
    assert f"zero-padding, seed 1: {dead} 2 of 10 evaluated rounds" in out  # not to the end


def test_status_says_which_entries_are_done_under_way_or_to_run(script, tmp_path):
    here = dict(script.status(REPO))
    assert here["mrpc-paper-a5 hlora seed 0"] == "done"  # committed
    runs = tmp_path / "results/mrpc-paper-a5/runs"
    shutil.copytree(REPO / "results/mrpc-paper-a5/runs/ffa-s0", runs / "ffa-s0")
    (runs / "zeropad-s2").mkdir(parents=True)  # stopped after three rounds
    (runs / "zeropad-s2/metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"round": 3}\n')
    for name in ("fedit-r2-s0", "fedit-r16-s0"):  # the references: two of their eight runs done
        shutil.copytree(REPO / "results/mrpc-paper-a5/runs/ffa-s0", runs / name)
    there = dict(script.status(tmp_path))
    assert there["mrpc-paper-a5 ffa seed 0"] == "done" and there["mrpc-paper-a5 zeropad seed 2"] == "3 rounds"
    # not done while the rest are to run
    assert there["mrpc-paper-a5 fedit seed 0"] == "2 of 8 runs done, 200 rounds"
    assert there["mrpc-paper-a5 hlora seed 0"] == "to run" and there["qqp-paper zeropad seed 0"] == "to run"


def test_rows_of_a_run_under_way_read_its_rounds_so_far(script, tmp_path, capsys, monkeypatch):
    """A run still training (no summary.json) gets its row to the last round it recorded, marked so; one
    that has scored no round yet is named on stderr beside the others' rows, and alone a one-line error,
    not a traceback."""
    committed = REPO / "results/mrpc-paper-a5/runs/ffa-s0"
    run = tmp_path / "ffa-s0"
    run.mkdir()
    lines = (committed / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:35]), encoding="utf-8")  # rounds 1-35
    done, _ = script.row(committed)
    so_far, note = script.row(run)
    assert so_far.startswith("| FFA-LoRA (under way: round 35) | ") and note is None
    accuracy = [cells.split(" | ")[1].split(", ") for cells in (done, so_far)]
    assert accuracy[1] == accuracy[0][:3]  # rounds 10, 20 and 30, as the finished run recorded them
    empty = tmp_path / "hlora-s0"
    empty.mkdir()
    monkeypatch.setattr(sys, "argv", ["paper_regime.py", "rows", str(run), str(empty)])
    script.main()
    out, err = capsys.readouterr()
    assert out.splitlines()[2:] == [so_far]
    assert err == f"skipped {empty}: no evaluated round recorded yet (in metrics.jsonl)\n"
    monkeypatch.setattr(sys, "argv", ["paper_regime.py", "rows", str(empty)])
    with pytest.raises(SystemExit):
        script.main()
    assert f"{empty}: no evaluated round recorded yet (in metrics.jsonl)" in capsys.readouterr().err


def test_clients_names_the_heaviest_client_of_each_round_from_the_records(script, capsys, monkeypatch):
    """Seed 1's shock (BENCHMARKS.md): in round 16 the round's heaviest client holds one class only and a
    third of the weight, its change 4 times the round's median, and the next round's clients pay for it."""
    run = REPO / "results/mrpc-paper-a5/runs/hlora-s1"
    lines = script.heaviest_clients(run, 15, 17)
    assert [line.split(" | ")[1] for line in lines] == ["15", "16", "17"]
    assert lines[1] == ("| hlora-s1 | 16 | 0.38 | 0.80 | 30, 233 rows, 0/233 (not_equivalent/equivalent), "
                        "rank 16 | 0.29 | 4.1 |")  # fmt: skip
    assert float(lines[2].split(" | ")[2]) > 1.5  # round 17's clients' loss: the shock
    monkeypatch.setattr(sys, "argv", ["paper_regime.py", "clients", str(run), "--rounds", "16"])
    script.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == script.CLIENTS_HEADER and out[2:] == [lines[1]]


def test_weights_reads_the_runs_partition_and_samples_without_training(script, glue_dir, capsys, monkeypatch):
    """`weights` draws the partition, ranks and rounds' samples a run gets: at seed 1 they are those that
    hlora-s1 recorded (client 30, all rows of one class, in 26 of its 100 rounds, 0.36 of round 47's
    weight), and seed 0 has no single-class client that weighs as much."""
    run = REPO / "results/mrpc-paper-a5/runs/hlora-s1"
    rounds = [json.loads(line)["clients"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "partition.csv").open() as f:
        size = {int(r["client"]): int(r["size"]) for r in csv.DictReader(f)}
    assert sum(30 in clients for clients in rounds) == 26
    assert round(size[30] / sum(size[c] for c in rounds[46]), 2) == 0.36
    row = script.heavy_rounds(REPO / A5, 1, 0.25)
    assert row.startswith("| 1 | 30, 233 rows, 0/233, rank 16 (not_equivalent/equivalent) | 26 of 100 | ")
    assert row.endswith(" | 0.36: 30, 233 rows, 0/233, rank 16, round 47 |")
    heavy = sum(max(size[c] for c in r) >= 0.25 * sum(size[c] for c in r) for r in rounds)
    assert int(row.split(" | ")[3]) == heavy
    monkeypatch.setattr(sys, "argv", ["paper_regime.py", "weights", A5, "--seeds", "0"])
    monkeypatch.chdir(REPO)
    script.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == script.WEIGHTS_HEADER.format(share=0.25) and len(out) == 3
    assert float(out[2].split(" | ")[4].split(":")[0]) < 0.1  # seed 0: no single-class client weighs much
