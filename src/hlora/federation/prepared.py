"""The prepared run: everything a run needs, loaded and checked before anything is written.

`prepare(settings)` loads the data, splits it over the clients, assigns their ranks, builds the model,
the method and the server, all from the run's seed, and raises HloraError on bad input. Both runtimes
start from it (the simulation for every client in one process; on Flower, the server and every node
prepare the same run). `save_checkpoint` and `restore` move a prepared run to and from its checkpoint
(`hlora.checkpoint` is the file format); `restore_run` rebuilds a stopped or finished run from its folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlora.aggregation import registry
from hlora.checkpoint import (
    Checkpoint,
    check_config,
    check_run_record,
    partition_record,
    read_run_config,
)
from hlora.client.client import apply_plan, merge_base
from hlora.config import Settings, effective_settings, fingerprint, fingerprinted
from hlora.data.glue import TaskSpec, get_task, load_split
from hlora.data.partition import dirichlet_partition, partition_table
from hlora.data.tokenize import EncodedSplit, encode, make_collator
from hlora.errors import CheckpointError
from hlora.federation.ranks import assign_ranks, resolve_bank_rank
from hlora.federation.server import FederatedServer
from hlora.models.lora_model import LoraModel, check_fit, load_base_model
from hlora.privacy.mechanism import DpMechanism
from hlora.seeding import initial_adapter_seed, rng_state, seed_everything

log = logging.getLogger("hlora")


def pick_device(name: str, key: str = "run.device") -> torch.device:
    """`auto` (CUDA when present, else the CPU), or a device this machine has: `cpu`, `cuda[:i]`, `mps`.
    ConfigError naming `key` (the setting or option it came from) for any other."""
    from hlora.errors import ConfigError  # here: the rest of this module never raises it

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}: unknown device {name!r}; use auto, cpu or cuda[:i]")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}: {name!r} asked for, but this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{key}: {name!r} asked for, but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: {name!r} asked for, but this machine has no MPS device")
    return device


@dataclass
class PreparedRun:
    """Everything a run needs, loaded and checked."""

    settings: Settings
    task: TaskSpec
    train: EncodedSplit
    dev: EncodedSplit
    model: LoraModel
    collate: Any
    partitions: list[np.ndarray]
    partition_rows: list[dict[str, Any]]
    client_ranks: dict[int, int]  # r_k of every client
    bank_rank: int  # r_g, the rank of the server's global adapter
    server: FederatedServer  # the round logic with its aggregation method and the round-0 global adapter
    majority_baseline: float
    data_source: str
    timings: dict[str, float] = field(default_factory=dict)


def split_clients(settings: Settings, labels: Any) -> tuple[list[np.ndarray], dict[int, int]]:
    """The clients' rows (indices into the training rows, from their `labels`) and their ranks: the
    seeded Dirichlet partition and the rank policy, so that anything that needs them without the model
    (`hlora compare`'s planning) gets the ones a run gets."""
    fed = settings.federation
    parts = dirichlet_partition(
        np.asarray(labels),
        fed.num_clients,
        fed.alpha,
        min_size=fed.min_client_size,
        seed=settings.run.seed,
        scheme=fed.partition,
        size_sigma=fed.size_sigma,
    )
    return parts, assign_ranks(settings.lora, [len(idx) for idx in parts], settings.run.seed)


def prepare(settings: Settings) -> PreparedRun:
    """Load and check the data, partitions and model. Raises HloraError on bad input; writes nothing."""
    check_fit(settings)  # what the model cannot serve, before anything slow
    if settings.privacy.enabled and settings.run.mode != "federated":
        log.warning("run.mode %r is a reference: it runs without [privacy]", settings.run.mode)
    settings = effective_settings(settings)
    t0 = time.perf_counter()
    task = get_task(settings.data.task)
    train_rows = load_split(task, "train", settings.data.data_dir).head(settings.data.max_train_samples)
    dev_rows = load_split(task, "dev", settings.data.data_dir).head(settings.data.max_eval_samples)
    fed = settings.federation
    # The partition and the ranks before the model: both cheap, both fail on user input.
    parts, client_ranks = split_clients(settings, train_rows.labels)
    local = settings.run.client if settings.run.mode == "local" else None
    if local is not None:  # the lower reference: this client's part and rank, and no other client
        parts, client_ranks = [parts[local]], {0: client_ranks[local]}
    bank_rank = resolve_bank_rank(settings.lora, client_ranks)
    aggregator = registry.create(fed.method, bank_rank, settings.run.seed, settings.method_options)
    t1 = time.perf_counter()
    seed_everything(settings.run.seed)
    base, tokenizer = load_base_model(settings.model, task.num_labels, seed=settings.run.seed)
    device = pick_device(settings.run.device)
    model = LoraModel(base, settings.lora, device)
    initial = model.initial_weights(bank_rank, seed=initial_adapter_seed(settings.run.seed))
    # The server refuses ranks its method cannot serve (FedIT with mixed ranks) here, before a run
    # directory exists. It weighs updates by the partition made here (in the simulation and on Flower
    # alike), never by the sizes clients claim.
    server = FederatedServer(
        aggregator,
        initial,
        client_ranks,
        fed.clients_per_round,
        settings.run.seed,
        min_clients=fed.min_clients,
        max_update_norm=fed.max_update_norm,
        client_sizes={cid: len(parts[cid]) for cid in client_ranks},
        update_norm_factor=fed.update_norm_factor,
        privacy=dp_mechanism(settings),
    )
    t2 = time.perf_counter()
    train = encode(train_rows, tokenizer, settings.data.max_length)
    dev = encode(dev_rows, tokenizer, settings.data.max_length)
    t3 = time.perf_counter()
    counts = np.bincount(dev.labels, minlength=task.num_labels)
    rows = partition_table(parts, np.asarray(train_rows.labels), list(task.label_names))
    rows = [{"client": r["client"], "size": r["size"], "rank": client_ranks[r["client"]], **r} for r in rows]
    if local is not None:  # partition.csv names the client by its id in the federated partition
        rows = [{**r, "client": local} for r in rows]
    return PreparedRun(
        settings=settings,
        task=task,
        train=train,
        dev=dev,
        model=model,
        collate=make_collator(tokenizer),
        partitions=parts,
        partition_rows=rows,
        client_ranks=client_ranks,
        bank_rank=bank_rank,
        server=server,
        majority_baseline=float(counts.max() / counts.sum()),
        data_source=train_rows.source,
        timings={"data_s": t1 - t0, "model_s": t2 - t1, "tokenize_s": t3 - t2},
    )


def dp_mechanism(settings: Settings) -> DpMechanism | None:
    """The server's DP mechanism of [privacy], or None where it is off. Under privacy the relative outlier
    rule (`federation.update_norm_factor`) is off (`FederatedServer`): it is logged here."""
    p = settings.privacy
    if not p.enabled:
        return None
    assert p.clip is not None
    if settings.federation.update_norm_factor != float("inf"):
        log.info("[privacy]: federation.update_norm_factor is off (one client's update must not decide "
                 "whether another's is included)")  # fmt: skip
    if not p.secure_noise:
        log.warning(
            "[privacy]: the noise is seeded from run.seed (reproducible, for experiments only: whoever "
            "knows the seed can subtract it); privacy.secure_noise = true draws it from the OS"
        )
    return DpMechanism(
        p.clip, p.noise_multiplier, settings.federation.clients_per_round, settings.run.seed, p.secure_noise
    )


def save_checkpoint(run_dir: Path, exp: PreparedRun, rnd: int, metrics: Sequence[dict[str, Any]]) -> None:
    """Commit the state at the end of round `rnd`, whose metrics row is the last of `metrics`."""
    Checkpoint(
        rnd,
        exp.server.state_dict(),
        {
            "fingerprint": fingerprint(exp.settings),
            "settings": fingerprinted(exp.settings),
            "bank_rank": exp.bank_rank,
            "client_ranks": {str(cid): r for cid, r in sorted(exp.client_ranks.items())},
            "partition": partition_record(exp.partitions),
            "rng": rng_state(),
            "metrics": list(metrics),
        },
    ).write(run_dir)


def restore(exp: PreparedRun, ckpt: Checkpoint) -> int:
    """Put a freshly prepared `exp` in its state at the end of round `ckpt.round`: the server's state,
    and the base deltas of the global model merged into the model. Checks first that the checkpoint
    belongs to this config, ranks and partition (CheckpointError if not). The RNG states are left to
    `set_rng_state(ckpt.rng)`, just before the rounds. Returns the checkpoint's round."""
    check_config(ckpt, exp.settings)
    expected = {
        "bank_rank": exp.bank_rank,
        "client_ranks": {str(cid): r for cid, r in sorted(exp.client_ranks.items())},
        "partition": partition_record(exp.partitions),
    }
    for key, value in expected.items():
        if ckpt.run.get(key) != value:
            raise CheckpointError(
                f"the checkpoint does not match this run's {key.replace('_', ' ')}: the data, or the code "
                "that splits it, changed since the run started"
            )
    try:
        exp.server.load_state_dict(ckpt.server)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's server state does not fit this run: {e}") from None
    merge_base(exp.model, exp.server.model_plan())  # the model is fresh: it holds no delta yet
    return ckpt.round


def restore_run(run_dir: Path) -> PreparedRun:
    """The run in `run_dir` as its last checkpoint left it: prepared from its `config.toml`, the server
    restored, FLoRA's base deltas merged, and the global adapter loaded into the model, so that
    `exp.model.module` is the global model. Raises RunDirError or CheckpointError (none yet, damaged,
    another config)."""
    run_dir = Path(run_dir)
    settings = read_run_config(run_dir)
    ckpt = Checkpoint.read(run_dir)
    if ckpt is None:
        raise CheckpointError(f"run {run_dir} has no checkpoint yet: no round has finished")
    check_run_record(ckpt, run_dir)
    check_config(ckpt, settings)
    exp = prepare(settings)
    restore(exp, ckpt)
    apply_plan(exp.model, exp.server.model_plan())
    return exp
