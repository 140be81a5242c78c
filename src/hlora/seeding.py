"""Every random draw of a run, from its one seed: the named streams and the global RNG states.

A draw never depends on what was drawn before it in the process: each comes from its own stream,
`derive_seed(run seed, ..., stream)`, so a round can be replayed alone (a resumed run, a Flower node that
starts a fresh process per message) and adding a draw somewhere cannot shift another.

| what                                   | seed                                              |
|----------------------------------------|---------------------------------------------------|
| the partition (`data.partition`)       | the run seed itself                               |
| the model's new head, LoRA's init      | the run seed (`models.lora_model`)                |
| the round-0 global adapter             | `initial_adapter_seed(seed)`                      |
| the rank tiers' shuffle                | `tier_seed(seed)`                                 |
| which clients a round samples          | `sampling_seed(seed, round)`                      |
| a client's batches and dropout         | `client_seed(seed, round, client)`                |
| injected faults (`[faults]`)           | `fault_seed(seed, round, client)`                 |
| Fed-PLoRA's modules a client trains    | `selection_seed(seed, round, client)`             |
| the sketch `Omega` of a secure round   | `sketch_seed(seed, round)`                        |
| a round's DP noise (`[privacy]`)       | `noise_seed(seed, round)`                         |
| a client's share of it (with `[secure]`) | `noise_share_seed(seed, round, client, stage)`  |

The stream tags are part of the results: changing one changes every run made since. The global RNGs
(Python's, numpy's, torch's) are set from the run seed as a run is prepared (`seed_everything`) and saved
and restored with each checkpoint (`rng_state`, `set_rng_state`) for whatever still draws from them.
"""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("hlora")

# Stream tags: each keeps its draws apart from every other use of the same (seed, round, client).
INITIAL_ADAPTER = 0xA11CE
TIERS = 0x7153E5
SAMPLING = 0x5A3D1E
FAULTS = 0xFA017
SELECTION = 0x5E1EC7
SKETCH = 0x5CE7C4
NOISE = 0xD9A015E


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (run seed, round, client, ...), not on call order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def initial_adapter_seed(seed: int) -> int:
    return derive_seed(seed, INITIAL_ADAPTER)


def tier_seed(seed: int) -> int:
    return derive_seed(seed, TIERS)


def sampling_seed(seed: int, rnd: int) -> int:
    return derive_seed(seed, rnd, SAMPLING)


def client_seed(seed: int, rnd: int, client_id: int) -> int:
    """The seed of one client's training in one round (its batch order and dropout), wherever it runs."""
    return derive_seed(seed, rnd, client_id)


def fault_seed(seed: int, rnd: int, client_id: int) -> int:
    return derive_seed(seed, rnd, client_id, FAULTS)


def selection_seed(seed: int, rnd: int, client_id: int) -> int:
    """The seed of the server's choice of what one client trains in one round (Fed-PLoRA's modules)."""
    return derive_seed(seed, rnd, client_id, SELECTION)


def sketch_seed(seed: int, rnd: int) -> int:
    """The seed of a secure round's random sketch `Omega` (`hlora.secure.two_stage`): the server sends
    this seed, not the matrix, and every party rebuilds the same `Omega` from it."""
    return derive_seed(seed, rnd, SKETCH)


def noise_seed(seed: int, rnd: int) -> int:
    """The seed of a round's differential-privacy noise (`hlora.privacy.mechanism`), unless
    `privacy.secure_noise` draws it from the OS. For experiments only: whoever knows it can subtract the
    noise. A resumed round draws the same noise as the round of a run that never stopped."""
    return derive_seed(seed, rnd, NOISE)


def noise_share_seed(seed: int, rnd: int, client_id: int, stage: int) -> int:
    """The seed of one client's share of the DP noise in one secure sum of a round (distributed DP,
    `hlora.federation.secure`), unless `privacy.secure_noise` has the client draw it from its OS. For
    experiments only, as `noise_seed`."""
    return derive_seed(seed, rnd, client_id, stage, NOISE)


def seed_everything(seed: int) -> None:
    """Every global RNG (Python's, numpy's, torch's) from the run's seed, so that a checkpoint's RNG
    states depend on the run alone, not on what the process did before it."""
    from transformers import set_seed

    set_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state (Python's, numpy's, torch's CPU and, once initialised, CUDA's) as JSON."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `rng_state()`'s output. CUDA's states are restored where as many devices are present."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    elif cuda:
        log.warning("the checkpoint holds CUDA RNG states for %d devices; not restored here", len(cuda))


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
