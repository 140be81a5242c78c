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
    BenchSpec,
    bench_case,
    hlora_path,
    layer_names,
    make_workload,
    peak_extra_bytes,
    peak_extra_rss,
)
from hlora.cli.main import main

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


def test_row_is_sane_and_the_methods_agree() -> None:
    row = bench_case(BenchSpec(clients=3, **TINY), repeats=2, memory=False)
    assert row.clients == 3 and 6 <= row.total_rank <= 24
    assert row.hlora_path == "qr"
    assert row.hlora_s > 0 and row.flexlora_s > 0
    assert row.speedup == pytest.approx(row.flexlora_s / row.hlora_s)
    assert row.hlora_largest == f"64x{row.total_rank}" and row.flexlora_largest == "64x64"
    assert row.max_rel_diff < 1e-5  # float32 results of the same truncated SVD
    assert row.hlora_peak_mib is None and row.memory_ratio is None


def test_row_says_when_hlora_falls_back_to_the_dense_path() -> None:
    row = bench_case(BenchSpec(clients=12, layers=1, width=32, ranks=(4, 8)), repeats=1, memory=False)
    assert row.total_rank >= 32 and row.hlora_path == "dense"
    assert row.hlora_largest == row.flexlora_largest == "32x32"
    assert row.max_rel_diff < 1e-5


@pytest.mark.parametrize("spec", [BenchSpec(clients=3, **TINY), BenchSpec(clients=12, layers=1, width=32)])
def test_hlora_path_is_the_path_the_aggregator_takes(spec: BenchSpec) -> None:
    work = make_workload(spec)
    with mock.patch.object(products, "_dense_mean", wraps=products._dense_mean) as dense:
        registry.create("hlora", spec.global_rank).aggregate(work.global_weights, work.updates)
    built_dense = dense.call_count > 0
    assert built_dense == (hlora_path(work.total_rank, spec.width, spec.width) == "dense")


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
    assert "hlora_path" in printed and "speedup" in printed
    rows = list(csv.DictReader(out.open()))
    assert [r["clients"] for r in rows] == ["3", "4"] and {r["hlora_path"] for r in rows} == {"qr"}
    assert all(float(r["max_rel_diff"]) < 1e-5 for r in rows)

    before = out.read_text()
    assert run_cli(*tiny, "--no-memory", "--csv", str(out)) == 2
    assert "exists already" in capsys.readouterr().err
    assert out.read_text() == before


@pytest.mark.parametrize("bad", [["--clients", "3,x"], ["--ranks", "0,4"], ["--repeats", "0"]])
def test_cli_refuses_bad_options(bad: list[str], capsys) -> None:
    assert run_cli(*bad) == 2
