"""`hlora bench aggregation` on tiny shapes: sane rows, agreeing results, honest memory, a working CLI.

Timings are never asserted: they depend on the machine.
"""

from __future__ import annotations

import csv
from pathlib import Path
from unittest import mock

import pytest
import torch

from hlora.aggregation import products, registry
from hlora.bench.aggregation import (
    AggregationRow,
    BenchSpec,
    bench_case,
    bench_methods,
    largest_intermediate,
    layer_names,
    make_workload,
    peak_extra_bytes,
    peak_extra_rss,
)
from hlora.cli.main import main
from hlora.errors import ConfigError

TINY = {"layers": 2, "width": 64, "ranks": (2, 4, 8)}  # K = 3: R <= 24 < 64, the QR path
LINUX_ONLY = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak RSS is reset through /proc/self/clear_refs"
)


def test_workload_has_the_asked_shapes_and_is_repeatable() -> None:
    spec = BenchSpec(clients=3, **TINY)
    work = make_workload(spec)
    assert list(work.global_weights.factors) == layer_names(2)
    assert len(layer_names(2)) == 4 and layer_names(2)[1].endswith("layer.0.attention.self.value")
    assert work.global_weights.rank == 8  # the largest client rank by default
    assert all(u.weights.rank in (2, 4, 8) and u.num_samples > 0 for u in work.updates)
    assert work.total_rank == sum(u.weights.rank for u in work.updates)
    again = make_workload(spec)
    assert all(
        torch.equal(a.weights.factors[name].B, b.weights.factors[name].B)
        for a, b in zip(work.updates, again.updates, strict=True)
        for name in layer_names(2)
    )


def by_method(rows: list[AggregationRow]) -> dict[str, AggregationRow]:
    return {row.method: row for row in rows}


def test_the_bench_measures_every_method_of_mixed_ranks_in_registry_order() -> None:
    methods = bench_methods()
    assert methods == [m for m in registry.ordered() if not registry.get(m).equal_ranks]
    assert registry.reference() not in methods  # FedIT averages factors of one rank only
    assert bench_methods(["flexlora", "hlora", "flexlora"]) == ["flexlora", "hlora"]
    with pytest.raises(ConfigError, match="one rank"):
        bench_methods([registry.reference()])


def test_rows_are_sane_and_the_same_update_agrees() -> None:
    rows = bench_case(BenchSpec(clients=3, **TINY), repeats=2, memory=False)
    assert [row.method for row in rows] == bench_methods()
    assert all(row.clients == 3 and 6 <= row.total_rank <= 24 and row.seconds > 0 for row in rows)
    twins = [row for row in rows if row.same_update_as is not None]
    assert [(row.method, row.same_update_as) for row in twins] == [("hlora", "flexlora")]
    row, dense = by_method(rows)["hlora"], by_method(rows)["flexlora"]
    assert row.speedup == pytest.approx(dense.seconds / row.seconds)
    assert row.largest == f"64x{row.total_rank}" and dense.largest == "64x64"  # the QR path: m x R
    assert row.max_rel_diff < 1e-5  # float32 results of the same truncated SVD
    assert row.peak_mib is None and row.memory_ratio is None
    assert dense.speedup is None and dense.max_rel_diff is None  # flexlora names no method of its own


def test_a_method_without_its_twin_is_measured_alone() -> None:
    (row,) = bench_case(BenchSpec(clients=3, **TINY), repeats=1, memory=False, methods=["hlora"])
    assert row.same_update_as is None and row.speedup is None and row.max_rel_diff is None


def test_row_says_when_hlora_falls_back_to_the_dense_path() -> None:
    spec = BenchSpec(clients=12, layers=1, width=32, ranks=(4, 8))
    rows = by_method(bench_case(spec, repeats=1, memory=False, methods=["hlora", "flexlora"]))
    assert rows["hlora"].total_rank >= 32
    assert rows["hlora"].largest == rows["flexlora"].largest == "32x32"
    assert rows["hlora"].max_rel_diff < 1e-5


@pytest.mark.parametrize("spec", [BenchSpec(clients=3, **TINY), BenchSpec(clients=12, layers=1, width=32)])
def test_the_largest_intermediate_shows_the_path_the_aggregator_takes(spec: BenchSpec) -> None:
    work = make_workload(spec)
    aggregator = registry.create("hlora", spec.global_rank)
    with mock.patch.object(products, "_dense_mean", wraps=products._dense_mean) as dense:
        largest = largest_intermediate(aggregator, work)
    assert (dense.call_count > 0) == (largest == f"{spec.width}x{spec.width}")
    assert (dense.call_count > 0) == (work.total_rank >= spec.width)


@LINUX_ONLY
def test_peak_extra_rss_counts_a_temporary_the_call_frees() -> None:
    size = 64 * 2**20
    peak = peak_extra_rss(lambda: torch.ones(size // 8, dtype=torch.float64).sum())
    assert peak >= size * 0.95


@LINUX_ONLY
def test_peak_memory_of_a_real_call_in_a_fresh_process() -> None:
    spec = BenchSpec(clients=3, layers=1, width=256, ranks=(4,))
    peak = peak_extra_bytes(spec, "flexlora")
    assert peak >= 256 * 256 * 8  # FlexLoRA holds at least the dense float64 dW


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(["bench", "aggregation", *args])
    return info.value.code


def test_cli_prints_the_table_and_writes_a_new_csv(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results" / "agg.csv"  # the folder is made
    tiny = ["--clients", "3,4", "--layers", "1", "--width", "32", "--ranks", "2,4", "--repeats", "1"]
    assert run_cli(*tiny, "--no-memory", "--csv", str(out)) == 0
    printed = capsys.readouterr().out
    assert "same_update_as" in printed and "speedup" in printed
    rows = [r for r in csv.DictReader(out.open()) if r["same_update_as"]]
    assert [(r["clients"], r["method"], r["same_update_as"]) for r in rows] == [
        ("3", "hlora", "flexlora"),
        ("4", "hlora", "flexlora"),
    ]
    assert all(float(r["max_rel_diff"]) < 1e-5 and r["largest"].endswith("x" + r["total_rank"]) for r in rows)

    before = out.read_text()
    assert run_cli(*tiny, "--no-memory", "--csv", str(out)) == 2
    assert "exists already" in capsys.readouterr().err
    assert out.read_text() == before


def test_cli_measures_the_methods_asked_for(capsys) -> None:
    tiny = ["--clients", "3", "--layers", "1", "--width", "32", "--ranks", "2,4", "--repeats", "1"]
    assert run_cli(*tiny, "--no-memory", "--methods", "zeropad,hlora") == 0
    table = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[2] for line in table] == ["zeropad", "hlora"]


@pytest.mark.parametrize(
    "bad",
    [
        ["--clients", "3,x"],
        ["--ranks", "0,4"],
        ["--repeats", "0"],
        ["--methods", "nope"],
        ["--methods", "fedit"],
    ],
)
def test_cli_refuses_bad_options(bad: list[str], capsys) -> None:
    assert run_cli(*bad) == 2
