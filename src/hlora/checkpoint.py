"""The checkpoint's file format: a run's state at the end of a round, as a dict, to and from disk.

This module reads and writes; it never rebuilds a live run (`hlora.federation.prepared` does: it saves a
prepared run's state here and restores one from it), so it imports nothing above the config.

`RUN_DIR/checkpoint/` holds the state at the end of the last finished round:

- `adapter.safetensors`: the global adapter, `FederatedServer.global_weights.tensors()` (LoRA factors
  and head);
- `aggregator.safetensors`: the aggregation method's tensors (empty for most);
- `blocks/<name>.safetensors`: the method's blocks, groups of tensors that never change once the method
  has made them (FLoRA's stack of each round): each is written once, by the first commit that holds it,
  so a commit costs what its round added, not everything the run has gathered;
- `state.json`: the round, the server's `version` and `synced`, the method's other state and the names
  of its blocks, the client ranks, the bank rank, the partition's sizes and hash, the config
  (`settings`, as the fingerprint covers it) and its fingerprint, every global RNG state, and the
  metrics rows so far.

Each safetensors file names its round in its metadata (`hlora_round`; a block file, its name). A save
first puts the blocks the committed checkpoint lacks in place (each written beside its name, then
renamed), then writes the three files beside their final names (`.NAME.tmp`) and renames them into
place, `state.json` last: `state.json` is the commit point, and a load takes only tensors that carry the
round it names, and the blocks it names. A kill between the renames leaves a complete `.state.json.tmp`
whose tensor files and blocks all exist, renamed or not: a load reads that newer checkpoint, and the next
save first finishes its renames (so that no complete `.state.json.tmp` is left to pair with the new
commit's half-written files). After a commit, block files it does not name (a killed or failed round's)
are removed. A block is rewritten only when the committed checkpoint does not name it.

Resume is exact on the CPU: each client's batches and dropout are seeded per (seed, round, client)
(`hlora.seeding`), the round's clients are a seeded draw, the restored global adapter is bit for bit the
saved one, and FLoRA's base deltas are merged into the fresh base model in the order the run merged them.
The global RNG states are restored too, for whatever draws from them (the dev loader's base seed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from hlora.config import (
    Settings,
    config_differences,
    effective_settings,
    fingerprint,
    load_settings,
)
from hlora.errors import CheckpointError, ConfigError, RunDirError
from hlora.rundir import CONFIG_FILE, SUMMARY_FILE, temp_path, write_temp
from hlora.seeding import rng_state, set_rng_state

log = logging.getLogger("hlora")

CHECKPOINT_DIR = "checkpoint"
ADAPTER_FILE = "adapter.safetensors"
AGGREGATOR_FILE = "aggregator.safetensors"
STATE_FILE = "state.json"
BLOCKS_DIR = "blocks"
FORMAT = 2  # of state.json (2: blocks); 1 is read too, another format is refused, not guessed at
_READS = (1, 2)
_ROUND_KEY = "hlora_round"  # safetensors metadata: the round a tensor file belongs to
_BLOCK_KEY = "hlora_block"  # safetensors metadata of a block file: its name
_BLOCK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # a file name inside blocks/, no path
_TENSOR_FILES = (ADAPTER_FILE, AGGREGATOR_FILE)
# What a resume may change in the run's config: the number of rounds, to extend a run.
RESUME_OVERRIDES = ("federation.rounds",)


@dataclass(frozen=True)
class Checkpoint:
    """The state at the end of round `round`, in memory."""

    round: int
    server: dict[str, Any]  # FederatedServer.state_dict()
    run: dict[str, Any]  # the runtime's part: fingerprint, client_ranks, bank_rank, partition, rng, metrics

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The metrics rows of rounds 1 to `round`."""
        return self.run["metrics"]

    @property
    def rng(self) -> dict[str, Any]:
        """The global RNG states at the end of the round (`rng_state()`)."""
        return self.run["rng"]

    def write(self, run_dir: Path) -> None:
        """Commit this checkpoint to `run_dir/checkpoint/` (`run_dir` exists), replacing the one there."""
        folder = Path(run_dir) / CHECKPOINT_DIR
        folder.mkdir(exist_ok=True)
        _finish_interrupted_commit(folder)
        method_state = self.server["aggregator"]
        blocks = {k: v for k, v in method_state.items() if is_block(v)}
        method_tensors = {k: v for k, v in method_state.items() if isinstance(v, Tensor)}
        server_json = {k: v for k, v in self.server.items() if k not in ("global_weights", "aggregator")}
        server_json["aggregator"] = {
            k: v for k, v in method_state.items() if k not in blocks and k not in method_tensors
        }
        server_json["blocks"] = sorted(blocks)
        state = {"format": FORMAT, "round": self.round, "server": server_json, **self.run}
        _write_blocks(folder, blocks)
        _commit(
            folder,
            {
                ADAPTER_FILE: _tensor_file(self.server["global_weights"], {_ROUND_KEY: str(self.round)}),
                AGGREGATOR_FILE: _tensor_file(method_tensors, {_ROUND_KEY: str(self.round)}),
                STATE_FILE: (json.dumps(state, indent=1) + "\n").encode("utf-8"),
            },
        )
        _drop_blocks_but(folder, blocks.keys())

    @classmethod
    def read(cls, run_dir: Path) -> Checkpoint | None:
        """The checkpoint in `run_dir/checkpoint/`; None where there is none yet (no round finished).
        Raises CheckpointError for a damaged one. Reads only."""
        folder = Path(run_dir) / CHECKPOINT_DIR
        found = _interrupted_commit(folder) or _committed(folder)
        if found is None:
            return None
        state, paths = found
        if state.get("format") not in _READS:
            raise CheckpointError(
                f"{folder / STATE_FILE} is of format {state.get('format')!r}; this hlora reads "
                f"{' and '.join(map(str, _READS))}"
            )
        common = {k: state[k] for k in ("format", "round", "server") if k in state}
        _validate(_State, common, folder / STATE_FILE)
        try:
            adapter = load_file(paths[ADAPTER_FILE])
            method_tensors = load_file(paths[AGGREGATOR_FILE])
            blocks = {name: _read_block(folder, name) for name in state["server"].get("blocks", [])}
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read the checkpoint in {folder}: {e}") from None
        server = {k: v for k, v in state["server"].items() if k != "blocks"}
        server["aggregator"] = {**server["aggregator"], **method_tensors, **blocks}
        server["global_weights"] = adapter
        run = {k: v for k, v in state.items() if k not in ("format", "round", "server")}
        return cls(int(state["round"]), server, run)


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Server(_Record):
    version: int = Field(ge=0)
    synced: dict[str, int]
    aggregator: dict[str, Any]
    blocks: list[str] = []  # absent in format 1; each a plain file name (`_block_path` checks)


class _Rng(BaseModel):
    python: tuple[int, list[int], float | None]
    numpy: tuple[str, list[int], int, int, float]
    torch: str
    cuda: list[str] | None = None


class _Partition(_Record):
    sizes: list[int]
    sha256: str


class _MetricsRow(_Record):
    round: int
    # absent on a round `eval.every` did not evaluate (`evaluated` false); rows older than `evaluated`
    # were all evaluated
    evaluated: bool = True
    accuracy: float | None = None
    uplink_bytes: int
    downlink_bytes: int
    wall_s: float

    @model_validator(mode="after")
    def _scored_when_evaluated(self) -> _MetricsRow:
        if self.evaluated and self.accuracy is None:
            raise ValueError("an evaluated round without its accuracy")
        return self


class _State(_Record):
    """What `Checkpoint.write` puts in `state.json` for every runtime; the runtime's own keys follow."""

    format: int
    round: int = Field(ge=1)
    server: _Server


class _RunRecord(_Record):
    """The part of `state.json` the runtimes write (`save_checkpoint`; `settings` absent in older ones)."""

    fingerprint: str
    settings: dict[str, Any] | None = None
    bank_rank: int = Field(ge=1)
    client_ranks: dict[str, int]
    partition: _Partition
    rng: _Rng
    metrics: list[_MetricsRow]


def _validate(model: type[BaseModel], data: Any, path: Path) -> None:
    """CheckpointError, in one line, unless `data` (JSON values) has `model`'s structure, strictly (no
    string for a number)."""
    try:
        model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the top level"
        raise CheckpointError(f"{path} is damaged: {where}: {err['msg']}") from None


def check_run_record(ckpt: Checkpoint, run_dir: Path) -> None:
    """CheckpointError, in one line, for a checkpoint whose runtime part is not what `save_checkpoint`
    made: a key missing, a value of the wrong type, metrics rows that are not rounds 1 to `round`, RNG
    states that the RNGs refuse. Changes nothing."""
    path = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
    _validate(_RunRecord, ckpt.run, path)
    rounds = [row["round"] for row in ckpt.metrics]
    if rounds != list(range(1, ckpt.round + 1)):
        raise CheckpointError(
            f"{path} is damaged: its metrics rows are of rounds {rounds[:5]}, not 1 to {ckpt.round}"
        )
    kept = rng_state()
    try:
        # The only sure test of a state is to set it (CUDA's aside: setting them would initialise CUDA).
        set_rng_state({k: v for k, v in ckpt.rng.items() if k != "cuda"})
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path} is damaged: its RNG states cannot be restored ({e})") from None
    finally:
        set_rng_state(kept)


def open_resume(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[Settings, Checkpoint | None]:
    """Check that the run in `run_dir` can go on, and say what from: its `config.toml` (with the
    `overrides` a resume allows, `federation.rounds=N`) and its last checkpoint (None: no round had
    finished, so the run starts again from round 1 in `run_dir`). Reads only; raises RunDirError,
    ConfigError or CheckpointError."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUME_OVERRIDES:
            raise ConfigError(
                f"--resume continues a run with its own {CONFIG_FILE}; --set may change only "
                f"{', '.join(RESUME_OVERRIDES)} (got {item!r})"
            )
    settings = read_run_config(Path(run_dir), overrides)
    ckpt = Checkpoint.read(run_dir)
    if ckpt is not None:
        check_run_record(ckpt, run_dir)
        check_config(ckpt, settings)
    done = ckpt.round if ckpt is not None else 0
    rounds = settings.federation.rounds
    if done > rounds:
        raise ConfigError(f"federation.rounds={rounds} is below the {done} rounds {run_dir} has finished")
    if (Path(run_dir) / SUMMARY_FILE).exists() and (done == rounds or ckpt is None):
        raise RunDirError(
            f"run {run_dir} is complete ({done or 'all'} of {rounds} rounds); nothing to resume "
            "(--set federation.rounds=N extends it)"
        )
    return settings, ckpt


def check_config(ckpt: Checkpoint, settings: Settings) -> None:
    """Raise CheckpointError unless `ckpt` was made by a run of `settings` (rounds aside). A setting that
    this hlora has and the checkpoint's does not (added since the run started) counts as the same where
    it holds its default, which keeps the behaviour the run had."""
    settings = effective_settings(settings)
    if ckpt.run.get("fingerprint") == fingerprint(settings):
        return
    stored = ckpt.run.get("settings")
    if stored is None:  # written before checkpoints held their config: only the hash can tell
        raise CheckpointError(
            f"the checkpoint (round {ckpt.round}) was made with another config than this {CONFIG_FILE}, "
            "or by an hlora whose config had other settings; was the file edited? Restore it, or start a "
            "new run"
        )
    changed = config_differences(stored, settings)
    if changed:
        listed = "; ".join(f"{key} = {was!r} there, {now!r} here" for key, was, now in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise CheckpointError(
            f"the checkpoint (round {ckpt.round}) was made with another config than this {CONFIG_FILE} "
            f"({listed}{more}); was the file edited? Restore it, or start a new run"
        )


def partition_record(partitions: Sequence[np.ndarray]) -> dict[str, Any]:
    """Enough to recognise a partition again: each client's size, and a sha256 of every client's rows."""
    digest = hashlib.sha256()
    for rows in partitions:
        digest.update(np.asarray(rows, dtype=np.int64).tobytes())
        digest.update(b"|")
    return {"sizes": [len(rows) for rows in partitions], "sha256": digest.hexdigest()}


def read_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Settings:
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
    return load_settings(run_dir / CONFIG_FILE, list(overrides))


def _tensor_file(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    # Own contiguous CPU copies: safetensors refuses views (a truncated B) and tensors sharing memory.
    own = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    return safetensors_bytes(own, metadata=dict(metadata))


def is_block(value: Any) -> bool:
    """Whether a method's state value is a block: a non-empty mapping of names to tensors, which the
    method never changes once it has returned it (`Aggregator.state_dict`)."""
    return isinstance(value, Mapping) and bool(value) and all(isinstance(t, Tensor) for t in value.values())


def _block_path(folder: Path, name: str) -> Path:
    if not _BLOCK_NAME.fullmatch(name):
        raise ValueError(f"block name {name!r} is not a plain file name")
    return folder / BLOCKS_DIR / f"{name}.safetensors"


def _committed_blocks(folder: Path) -> set[str]:
    """The blocks the committed `state.json` names (none where it is missing or unreadable)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        return set(state["server"].get("blocks", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _write_blocks(folder: Path, blocks: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Put in place, durably, each of `blocks` that the committed checkpoint does not name (a kill or a
    failed round may have left another version of it: it is replaced)."""
    committed = _committed_blocks(folder)
    for name, tensors in blocks.items():
        path = _block_path(folder, name)
        if name in committed and path.is_file():
            continue
        path.parent.mkdir(exist_ok=True)
        os.replace(write_temp(path, _tensor_file(tensors, {_BLOCK_KEY: name}), durable=True), path)


def _drop_blocks_but(folder: Path, keep: Iterable[str]) -> None:
    """Remove the block files (and temporary files) in `folder/blocks/` that are not `keep`."""
    wanted = {f"{name}.safetensors" for name in keep}
    for path in (folder / BLOCKS_DIR).glob("*") if (folder / BLOCKS_DIR).is_dir() else ():
        if path.name not in wanted:
            path.unlink(missing_ok=True)


def _read_block(folder: Path, name: str) -> dict[str, Tensor]:
    """The tensors of block `name`; CheckpointError where its file is missing or holds another block."""
    try:
        path = _block_path(folder, name)
    except ValueError as e:
        raise CheckpointError(f"{folder / STATE_FILE} is damaged: {e}") from None
    if not path.is_file():
        raise CheckpointError(f"{path} is missing, but {STATE_FILE} names it: the checkpoint is damaged")
    with safe_open(str(path), "pt") as f:
        held = (f.metadata() or {}).get(_BLOCK_KEY)
        if held != name:
            raise CheckpointError(f"{path} holds block {held!r}, not {name!r}: the checkpoint is damaged")
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has keys(), no iteration)


def _commit(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write every file beside its final name, then rename them in order (the last is the commit)."""
    for name, data in files.items():
        write_temp(folder / name, data, durable=True)
    for name in files:
        os.replace(temp_path(folder / name), folder / name)


def _finish_interrupted_commit(folder: Path) -> None:
    """Do the renames a kill left undone, so that the commit's `.state.json.tmp` is gone before the
    next commit overwrites the temporary tensor files it names."""
    found = _interrupted_commit(folder)
    if found is None:
        return
    for name, path in found[1].items():
        if path != folder / name:
            os.replace(path, folder / name)
    os.replace(temp_path(folder / STATE_FILE), folder / STATE_FILE)


def _round_of(path: Path) -> int | None:
    """The round a tensor file names in its metadata; None for a missing or unreadable file."""
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {})[_ROUND_KEY])
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def _committed(folder: Path) -> tuple[dict[str, Any], dict[str, Path]] | None:
    """The committed checkpoint: `state.json` and the tensor files, which must carry its round."""
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is damaged: it holds a JSON {type(state).__name__}, not an object")
    paths = {name: folder / name for name in _TENSOR_FILES}
    for file in paths.values():
        found = _round_of(file)
        if found != state.get("round"):
            held = "is missing or unreadable" if found is None else f"holds round {found}"
            raise CheckpointError(
                f"{file} {held}, but {STATE_FILE} names round {state.get('round')!r}: "
                "the checkpoint is damaged"
            )
    return state, paths


def _interrupted_commit(folder: Path) -> tuple[dict[str, Any], dict[str, Path]] | None:
    """A commit that a kill stopped between its renames: a complete `.state.json.tmp`, and for each
    tensor file its final or its temporary version carrying that round. None where there is none (a
    kill while the temporary files were written leaves the previous commit whole)."""
    try:
        state = json.loads(temp_path(folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    paths = {}
    for name in _TENSOR_FILES:
        for candidate in (folder / name, temp_path(folder / name)):
            if _round_of(candidate) == state.get("round"):
                paths[name] = candidate
                break
        else:
            return None
    try:
        blocks = [_block_path(folder, name) for name in state["server"].get("blocks", [])]
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    if not all(path.is_file() for path in blocks):
        return None
    return state, paths
