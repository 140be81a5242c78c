"""Training throughput of one run using every core against several runs side by side, a core or so each.

A comparison is many independent runs (methods x seeds, plus references). On a CPU they can run one at
a time with every core's thread (`hlora compare ... --seeds 0,1,2`), or several at once with fewer
threads each (`OMP_NUM_THREADS=1 hlora compare ... --seeds 0 &` and the same for seed 1): which gets
more training done per second depends on how well a small model's matrix products use extra threads.
This measures it with hlora's own client as an experiment config trains it (its model, task, LoRA at
its largest client rank, and its training settings; default the RTE quick profile): the same local
epoch over `--rows` rows of the task's training split, in one process with `--cores` torch threads, and
in `--cores` processes with one thread each started together. The two set-ups alternate `--repeats` times,
each in fresh processes, and the ratio of the median aggregate throughputs is printed.

    python benchmarks/parallel_runs.py [--config configs/experiments/rte-quick-iid.toml] [--rows 160]
        [--repeats 3] [--cores N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _train(threads: int, config: Path, rows: int, ready, go, out) -> None:
    """In a fresh process: build the client, wait for the others, time one local epoch over `rows`."""
    import torch

    torch.set_num_threads(threads)
    from hlora.client.trainer import LocalTrainer
    from hlora.config import load_settings
    from hlora.data.glue import get_task, load_split
    from hlora.data.tokenize import encode, make_collator
    from hlora.models.lora_model import LoraModel, load_base_model

    settings = load_settings(config)
    task = get_task(settings.data.task)
    lora = settings.lora
    rank = lora.max_client_rank  # the largest rank a client of the config trains
    base, tokenizer = load_base_model(settings.model, task.num_labels, seed=0)
    rows_ = load_split(task, "train", settings.data.data_dir).head(rows)
    data = encode(rows_, tokenizer, settings.data.max_length)
    model = LoraModel(base, lora, torch.device("cpu"))
    trainer = LocalTrainer(model, settings.train, make_collator(tokenizer), progress=False)
    start = model.initial_weights(rank, seed=0)
    trainer.train(start, data.subset(range(16)), seed=0)  # warm-up
    ready.wait()
    go.wait()
    t0 = time.perf_counter()
    trainer.train(start, data, seed=0)
    out.put((rows, time.perf_counter() - t0))


def aggregate_throughput(procs: int, threads: int, config: Path, rows: int) -> float:
    """Samples a second over `procs` processes of `threads` threads training at the same time."""
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Barrier(procs + 1), ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=_train, args=(threads, config, rows, ready, go, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    ready.wait()  # every process has loaded the model and warmed up
    go.wait()
    results = [out.get() for _ in workers]
    for w in workers:
        w.join()
    # Wall time of the set: until the slowest process ends (all started together).
    return sum(n for n, _ in results) / max(s for _, s in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/experiments/rte-quick-iid.toml"))
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    one, many = [], []
    for _ in range(args.repeats):
        one.append(aggregate_throughput(1, args.cores, args.config, args.rows))
        many.append(aggregate_throughput(args.cores, 1, args.config, args.rows))
    a, b = statistics.median(one), statistics.median(many)
    print(f"{args.config.name}, {args.rows} rows a process, {args.repeats} repeats")
    print(f"1 run x {args.cores} threads : {a:7.1f} samples/s  ({', '.join(f'{x:.1f}' for x in one)})")
    print(f"{args.cores} runs x 1 thread  : {b:7.1f} samples/s  ({', '.join(f'{x:.1f}' for x in many)})")
    print(f"side by side / one at a time: {b / a:.2f}x")


if __name__ == "__main__":
    main()
