"""Server aggregation cost: HLoRA (METHOD.md rule 3) against FlexLoRA (rule 4) on the same client updates.

Both methods compute the same truncated SVD of the product mean `dW = sum_k p_k B_k @ A_k`; HLoRA gets it
from QRs of the stacked factors (largest intermediate `max(m, n) x R`, `R = sum r_k`), FlexLoRA from the
dense `m x n` matrix. This module builds random client updates of a model's shapes (by default
RoBERTa-large: 24 layers, query and value, 1024 x 1024), runs both registered aggregators through the
real `Aggregator.aggregate` on them, and reports per client count K:

- time: the median of several calls, the two methods interleaved (A B A B ...) in one process so that
  machine noise hits both alike;
- peak memory: the extra memory one `aggregate` call needs on top of the inputs it is given
  (`peak_extra_bytes`);
- the largest intermediate each path holds per adapted weight, from the algorithm (not measured);
- agreement: the largest relative difference between the two results' products `B @ A`.

Where `R >= min(m, n)` HLoRA itself falls back to the dense path (METHOD.md rule 3), and the row says so.
"""

from __future__ import annotations

import csv
import gc
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from hlora.aggregation import registry
from hlora.aggregation.base import Aggregator
from hlora.errors import HloraError
from hlora.protocol import ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors

METHODS = ("hlora", "flexlora")  # the method under test first, the dense reference second
TARGETS = ("query", "value")
MIB = 2**20


class BenchOutputError(HloraError):
    """A results file that exists already: benchmark results are never overwritten."""


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark case: K clients adapting `layers x len(TARGETS)` weights of `width x width`."""

    clients: int
    layers: int = 24
    width: int = 1024  # m = n, RoBERTa-large's hidden size
    ranks: tuple[int, ...] = (4, 8, 16, 32)  # each client's rank is drawn from these
    seed: int = 0
    bank_rank: int | None = None  # r_g; None: the largest of `ranks`
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.clients < 1 or self.layers < 1 or self.width < 1:
            raise ValueError(f"clients, layers and width must be >= 1, got {self}")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")

    @property
    def global_rank(self) -> int:
        return self.bank_rank or max(self.ranks)


@dataclass(frozen=True)
class Workload:
    """The inputs of one aggregation: the global adapter (its layers say what is aggregated) and the
    clients' updates."""

    global_weights: AdapterWeights
    updates: list[ClientUpdate]

    @property
    def total_rank(self) -> int:
        """`R = sum r_k`, the same for every layer (a client has one rank)."""
        return sum(u.weights.rank for u in self.updates)

    def first_layer(self) -> Workload:
        """The same clients on one layer only: a cheap call that loads libraries and starts threads."""
        name, factors = next(iter(self.global_weights.factors.items()))
        return Workload(AdapterWeights({name: factors}), self.updates)


@dataclass(frozen=True)
class AggregationRow:
    """One line of the table: both methods on the same K clients."""

    clients: int
    total_rank: int  # R = sum r_k per adapted weight
    hlora_path: str  # "qr", or "dense" where R >= min(m, n) (METHOD.md rule 3)
    hlora_s: float  # median seconds of one aggregate() over all layers
    flexlora_s: float
    speedup: float  # flexlora_s / hlora_s
    hlora_peak_mib: float | None  # peak extra memory of one aggregate(); None where it cannot be measured
    flexlora_peak_mib: float | None
    memory_ratio: float | None  # flexlora / hlora
    hlora_largest: str  # the largest intermediate per adapted weight, rows x columns
    flexlora_largest: str
    max_rel_diff: float  # max over layers of max|dW_hlora - dW_flexlora| / max|dW_flexlora|


def layer_names(layers: int) -> list[str]:
    """RoBERTa's module paths of the adapted weights, so the workload looks like a real adapter."""
    return [f"roberta.encoder.layer.{i}.attention.self.{t}" for i in range(layers) for t in TARGETS]


def make_workload(spec: BenchSpec) -> Workload:
    """Random client updates: ranks drawn from `spec.ranks` and sample counts from 100..1999 with a
    numpy RNG seeded by `spec.seed`, factors standard normal in float32 (what clients send). The
    values do not change the cost; the seed makes the same case repeatable in another process."""
    rng = np.random.default_rng(spec.seed)
    ranks = rng.choice(spec.ranks, size=spec.clients).tolist()
    samples = rng.integers(100, 2000, size=spec.clients).tolist()
    gen = torch.Generator().manual_seed(spec.seed)
    names = layer_names(spec.layers)
    m = n = spec.width

    def factors(rank: int) -> dict[str, LoraFactors]:
        return {
            name: LoraFactors(
                torch.randn(m, rank, generator=gen).to(spec.device),
                torch.randn(rank, n, generator=gen).to(spec.device),
            )
            for name in names
        }

    updates = [
        ClientUpdate(client_id=k, num_samples=s, weights=AdapterWeights(factors(r)))
        for k, (r, s) in enumerate(zip(ranks, samples, strict=True))
    ]
    zeros = LoraFactors(
        torch.zeros(m, spec.global_rank, device=spec.device),
        torch.zeros(spec.global_rank, n, device=spec.device),
    )
    return Workload(AdapterWeights(dict.fromkeys(names, zeros)), updates)


def hlora_path(total_rank: int, m: int, n: int) -> str:
    """Which path `aggregate_products` takes: METHOD.md rule 3 builds the dense `dW` only where the
    rank sum reaches the smaller side, since then the stacked factors are no smaller than `dW`."""
    return "dense" if total_rank >= min(m, n) else "qr"


def largest_intermediate(method: str, total_rank: int, m: int, n: int) -> str:
    """The largest matrix a method holds per adapted weight, from the algorithm: HLoRA's QR path holds
    the stacked factors and their Q (`m x R`, `R x n`) and the `R x R` core; a dense path holds `dW`
    and its SVD (`m x n`). Neither ever holds a client's own `m x n` product."""
    if method == "hlora" and hlora_path(total_rank, m, n) == "qr":
        return f"{max(m, n)}x{total_rank}"
    return f"{m}x{n}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(aggregator: Aggregator, work: Workload, device: torch.device) -> tuple[float, AdapterWeights]:
    gc.collect()  # so that no collection of earlier garbage lands inside the timed call
    _sync(device)
    start = time.perf_counter()
    result = aggregator.aggregate(work.global_weights, work.updates)
    _sync(device)
    return time.perf_counter() - start, result


def time_methods(
    aggregators: dict[str, Aggregator], work: Workload, repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, AdapterWeights]]:
    """Seconds of each `aggregate` call, the methods interleaved `repeats` times after a one-layer
    warm-up of each; also the last result of each method."""
    for aggregator in aggregators.values():
        _timed(aggregator, work.first_layer(), device)
    seconds: dict[str, list[float]] = {name: [] for name in aggregators}
    results: dict[str, AdapterWeights] = {}
    for _ in range(repeats):
        for name, aggregator in aggregators.items():
            elapsed, results[name] = _timed(aggregator, work, device)
            seconds[name].append(elapsed)
    return seconds, results


def max_relative_difference(a: AdapterWeights, b: AdapterWeights) -> float:
    """The largest `max|B_a A_a - B_b A_b| / max|B_b A_b|` over the adapted weights, in float64: the two
    methods split `dW` differently between `B` and `A`, so only the products are comparable."""
    worst = 0.0
    for name, fb in b.factors.items():
        fa = a.factors[name]
        ref = fb.B.double() @ fb.A.double()
        diff = (fa.B.double() @ fa.A.double() - ref).abs().max()
        worst = max(worst, float(diff / ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)))
    return worst


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def peak_extra_rss(call: Callable[[], object]) -> int | None:
    """Peak resident memory that `call()` adds to this process, in bytes (Linux only; None elsewhere).

    The kernel's high-water mark (VmHWM) is reset to the current resident size (VmRSS) by writing 5 to
    `/proc/self/clear_refs`; after the call, `VmHWM - VmRSS(before)` is the most memory the process held
    beyond what it held before: tensors, LAPACK workspace, allocator slack and the result, which the
    caller keeps. torch has no allocator statistics on CPU, and this counts what the OS must provide.
    """
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        return None
    gc.collect()
    before = _status_kib("VmRSS")
    clear_refs.write_text("5")
    result = call()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) * 1024


def _child_peak_bytes(spec: BenchSpec, method: str, threads: int) -> int | None:
    """Runs in a fresh process: build the workload, warm up on one layer, then measure one full call.
    A fresh process per measurement keeps one method's freed-but-kept heap from hiding the other's."""
    torch.set_num_threads(threads)
    work = make_workload(spec)
    aggregator = registry.create(method, spec.global_rank, seed=spec.seed)
    aggregator.aggregate(work.first_layer().global_weights, work.updates)
    return peak_extra_rss(lambda: aggregator.aggregate(work.global_weights, work.updates))


def peak_extra_bytes(spec: BenchSpec, method: str) -> int | None:
    """Peak extra memory of one `aggregate` call of `method` on `spec`'s workload, in bytes.

    CUDA: `max_memory_allocated` over the call minus what was allocated before it (the caching
    allocator's own statistics: tensors only). CPU: `peak_extra_rss` in a fresh spawned process that
    already holds the inputs (None where the OS cannot reset its high-water mark).
    """
    device = torch.device(spec.device)
    if device.type == "cuda":
        work = make_workload(spec)
        aggregator = registry.create(method, spec.global_rank, seed=spec.seed)
        aggregator.aggregate(work.first_layer().global_weights, work.updates)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = aggregator.aggregate(work.global_weights, work.updates)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_child_peak_bytes, spec, method, torch.get_num_threads()).result()


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / MIB


def bench_case(spec: BenchSpec, repeats: int, memory: bool = True) -> AggregationRow:
    """Both methods on one case: median time, peak extra memory (unless `memory` is False) and
    agreement."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(spec.device)
    work = make_workload(spec)
    aggregators = {name: registry.create(name, spec.global_rank, seed=spec.seed) for name in METHODS}
    seconds, results = time_methods(aggregators, work, repeats, device)
    diff = max_relative_difference(results["hlora"], results["flexlora"])
    total_rank, m, n = work.total_rank, spec.width, spec.width
    del work, results  # the memory measurement builds its own inputs
    peaks = {name: _mib(peak_extra_bytes(spec, name)) if memory else None for name in METHODS}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    ratio = None
    if peaks["hlora"] and peaks["flexlora"] is not None:
        ratio = peaks["flexlora"] / peaks["hlora"]
    return AggregationRow(
        clients=spec.clients,
        total_rank=total_rank,
        hlora_path=hlora_path(total_rank, m, n),
        hlora_s=median["hlora"],
        flexlora_s=median["flexlora"],
        speedup=median["flexlora"] / median["hlora"],
        hlora_peak_mib=peaks["hlora"],
        flexlora_peak_mib=peaks["flexlora"],
        memory_ratio=ratio,
        hlora_largest=largest_intermediate("hlora", total_rank, m, n),
        flexlora_largest=largest_intermediate("flexlora", total_rank, m, n),
        max_rel_diff=diff,
    )


def run_bench(
    clients: Sequence[int], repeats: int, memory: bool = True, **spec_fields: object
) -> Iterator[AggregationRow]:
    """`bench_case` for each client count in turn (the same seed, so K = 20 extends nothing of K = 10:
    each case is drawn on its own). `spec_fields` are the other `BenchSpec` fields."""
    for k in clients:
        yield bench_case(BenchSpec(clients=k, **spec_fields), repeats, memory)


_COLUMNS = (  # header, width, format of the AggregationRow field of the same position
    ("K", 4, "{}"),
    ("R", 5, "{}"),
    ("hlora_path", 10, "{}"),
    ("hlora_s", 8, "{:.3f}"),
    ("flexlora_s", 10, "{:.3f}"),
    ("speedup", 7, "{:.1f}x"),
    ("hlora_MiB", 9, "{:.1f}"),
    ("flexlora_MiB", 12, "{:.1f}"),
    ("mem_ratio", 9, "{:.1f}x"),
    ("hlora_largest", 13, "{}"),
    ("flexlora_largest", 16, "{}"),
    ("max_rel_diff", 12, "{:.1e}"),
)


def table_header() -> str:
    return "  ".join(f"{h:>{w}}" for h, w, _ in _COLUMNS)


def table_row(row: AggregationRow) -> str:
    values = [getattr(row, f.name) for f in fields(row)]
    cells = ["n/a" if v is None else fmt.format(v) for v, (_, _, fmt) in zip(values, _COLUMNS, strict=True)]
    return "  ".join(f"{c:>{w}}" for c, (_, w, _) in zip(cells, _COLUMNS, strict=True))


def write_csv(rows: Sequence[AggregationRow], path: Path) -> None:
    """The rows as CSV with the `AggregationRow` field names as header; never overwrites a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(AggregationRow)])
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    except FileExistsError:
        raise BenchOutputError(f"{path} exists already; benchmark results are never overwritten") from None
