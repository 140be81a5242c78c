"""Server aggregation cost: every method that serves mixed ranks, on the same client updates.

This module builds random client updates of a model's shapes (by default RoBERTa-large: 24 layers, query
and value, 1024 x 1024) with mixed client ranks, runs each registered aggregator that can serve them (not
`equal_ranks`; or the methods asked for) through the real `Aggregator.aggregate`, and reports per client
count K and method:

- time: the median of several calls, the methods interleaved (A B C A B C ...) in one process so that
  machine noise hits all alike;
- peak memory: the extra memory one `aggregate` call needs on top of the inputs it is given
  (`peak_extra_bytes`);
- the largest intermediate the call makes per adapted weight: the largest tensor any torch operation
  returns during one call on one adapted weight (`largest_intermediate`);
- against the method that computes the same update by another path (`Aggregator.same_update_as`:
  HLoRA's QR path against FlexLoRA's dense SVD, METHOD.md rules 3 and 4), when both are measured: the
  speed-up, the memory ratio, and agreement, the largest relative difference of their products `B @ A`.

Where `R = sum r_k >= min(m, n)` HLoRA itself builds the dense `dW` (METHOD.md rule 3), and its largest
intermediate says so.
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
from hlora.errors import ConfigError, HloraError
from hlora.protocol import ClientUpdate
from hlora.weights import AdapterWeights, LoraFactors

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
    """One line of the table: one method on K clients, beside the method of the same update if measured."""

    clients: int
    total_rank: int  # R = sum r_k per adapted weight
    method: str
    seconds: float  # median seconds of one aggregate() over all layers
    peak_mib: float | None  # peak extra memory of one aggregate(); None where not measured
    largest: str  # the largest intermediate per adapted weight, rows x columns (`largest_intermediate`)
    same_update_as: str | None  # the method of the same update (Aggregator.same_update_as), if measured
    speedup: float | None  # its seconds / these
    memory_ratio: float | None  # its peak / this one
    max_rel_diff: float | None  # max over layers of max|dW_this - dW_its| / max|dW_its|


def bench_methods(methods: Sequence[str] | None = None) -> list[str]:
    """`methods` (each registered and able to serve mixed ranks), or every registered method that can,
    in `registry.ordered()`; ConfigError naming one that is not."""
    if methods is None:
        return [name for name in registry.ordered() if not registry.get(name).equal_ranks]
    for name in methods:
        if registry.get(name).equal_ranks:
            raise ConfigError(f"method {name!r} needs one rank for every client: the bench's ranks are mixed")
    return list(dict.fromkeys(methods))


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


def largest_intermediate(aggregator: Aggregator, work: Workload) -> str:
    """The largest tensor (by elements) that any torch operation returns during one `aggregate` call on
    the workload's first adapted weight, as its sides largest first (`1024x128`): measured, so it shows
    the path a method took (HLoRA's stacked factors, `m x R`, or a dense `m x n` product)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        shape: tuple[int, ...] = ()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() > np.prod(self.shape, dtype=np.int64):
                    self.shape = tuple(t.shape)
            return out

    one = work.first_layer()
    with Largest() as seen:
        aggregator.aggregate(one.global_weights, one.updates)
    return "x".join(str(side) for side in sorted(seen.shape, reverse=True))


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


def bench_case(
    spec: BenchSpec, repeats: int, memory: bool = True, methods: Sequence[str] | None = None
) -> list[AggregationRow]:
    """`bench_methods(methods)` on one case: median time, peak extra memory (unless `memory` is False),
    largest intermediate, and the comparison with the method of the same update where both ran."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(spec.device)
    work = make_workload(spec)
    aggregators = {
        name: registry.create(name, spec.global_rank, seed=spec.seed) for name in bench_methods(methods)
    }
    seconds, results = time_methods(aggregators, work, repeats, device)
    largest = {name: largest_intermediate(aggregator, work) for name, aggregator in aggregators.items()}
    twins = {name: a.same_update_as for name, a in aggregators.items() if a.same_update_as in aggregators}
    diffs = {name: max_relative_difference(results[name], results[twin]) for name, twin in twins.items()}
    total_rank = work.total_rank
    del work, results  # the memory measurement builds its own inputs
    peaks = {name: _mib(peak_extra_bytes(spec, name)) if memory else None for name in aggregators}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    rows = []
    for name in aggregators:
        twin = twins.get(name)
        ratio = None
        if twin is not None and peaks[name] and peaks[twin] is not None:
            ratio = peaks[twin] / peaks[name]
        rows.append(
            AggregationRow(
                clients=spec.clients,
                total_rank=total_rank,
                method=name,
                seconds=median[name],
                peak_mib=peaks[name],
                largest=largest[name],
                same_update_as=twin,
                speedup=median[twin] / median[name] if twin is not None else None,
                memory_ratio=ratio,
                max_rel_diff=diffs.get(name),
            )
        )
    return rows


def run_bench(
    clients: Sequence[int],
    repeats: int,
    memory: bool = True,
    methods: Sequence[str] | None = None,
    **spec_fields: object,
) -> Iterator[AggregationRow]:
    """`bench_case` for each client count in turn (the same seed, so K = 20 extends nothing of K = 10:
    each case is drawn on its own), its rows one by one. `spec_fields` are the other `BenchSpec` fields."""
    for k in clients:
        yield from bench_case(BenchSpec(clients=k, **spec_fields), repeats, memory, methods)


_COLUMNS = (  # header, width, format of the AggregationRow field of the same position
    ("K", 4, "{}"),
    ("R", 5, "{}"),
    ("method", 8, "{}"),
    ("seconds", 8, "{:.3f}"),
    ("peak_MiB", 8, "{:.1f}"),
    ("largest", 9, "{}"),
    ("same_update_as", 14, "{}"),
    ("speedup", 7, "{:.1f}x"),
    ("mem_ratio", 9, "{:.1f}x"),
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
