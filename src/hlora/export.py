"""The model a client holds, written as files that plain `peft` and `transformers` load, and read back.

`export_model(plan, settings, out_dir)` writes a standard PEFT adapter folder (`adapter_config.json`,
`adapter_model.safetensors`) with the tokenizer, such that

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=...)
    model = PeftModel.from_pretrained(base, out_dir)

is the model hlora evaluates for that plan, on any machine: the adapter names its base by a name, never by
a path of the machine that wrote it (`portable_model_name`: the packaged default by the public id of the
same weights, which `resolve_model_path` maps back to the packaged copy offline). With `merged=True` it
writes a plain `transformers` model folder with the adapter merged in. The folder is built through PEFT
itself (a fresh base, `get_peft_model`, the tensors copied in, `save_pretrained`), so its format is
PEFT's, not a copy of it.

Two things in a plan are not an ordinary adapter, and both are exported exactly:

- Base deltas (FLoRA): the plan asks for `W0 += s B_i A_i` to be folded into the frozen weights
  (`LoraModel.merge`) before its adapter `(B, A)` applies. A PEFT adapter cannot change its base, but one
  adapter of rank `R = r_1 + ... + r_n + r` with the factors side by side,
  `B* = [B_1 ... B_n B]` (`m x R`) and `A* = [A_1; ...; A_n; A]` (`R x n`), has
  `B* A* = sum_i B_i A_i + B A`; saved with `lora_alpha = s R`, PEFT's scaling `lora_alpha / r` is the
  same `s`, so `W0 + s B* A*` is the merged model exactly (up to float rounding: the merged weights are
  rounded once more).
- Parameters the base checkpoint lacks (the new head; a pooler that a sentence-embedding checkpoint
  omits) are random at load. hlora seeds them; a fresh `from_pretrained` elsewhere does not. The ones
  that do not train are added to the adapter's `modules_to_save` with their seeded values, so the
  adapter carries them.

`hlora_export.json` beside the PEFT files records what PEFT's config cannot: the task, the tokenizer's
`max_length`, the base deltas' ranks, and where the model came from (for a base that was a local folder
with no public name, that folder: the adapter names it by its folder name, and elsewhere the user
supplies their copy).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from hlora.config import LoraSettings, ModelSettings, Settings
from hlora.data.glue import get_task
from hlora.errors import ExportError, ModelError
from hlora.models.lora_model import (
    LOAD_ERRORS,
    LoadedBase,
    load_base,
    load_classifier,
    local_only,
    one_line,
    portable_model_name,
    quiet_transformers,
    resolve_model_path,
    seeded_load,
)
from hlora.protocol import ClientPlan
from hlora.weights import AdapterWeights, LoraFactors

EXPORT_INFO_FILE = "hlora_export.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's
_PEFT_PREFIX = "base_model.model."
_SLOT = "default"  # the adapter name PEFT saves at the folder's top level


def flatten_plan(plan: ClientPlan) -> AdapterWeights:
    """The plan's base deltas and its adapter as one adapter over the un-merged base.

    Per adapted weight, `B* = [B_1 ... B_n B]` (`m x R`) and `A* = [A_1; ...; A_n; A]` (`R x n`), deltas
    oldest first, `R = r_1 + ... + r_n + r`: `B* A* = sum_i B_i A_i + B A`, so at the same scale `s` the
    adapter makes the model that `LoraModel.merge` of every delta followed by the plan's adapter makes.
    A delta that leaves a weight out adds zero columns and rows there, so every weight has rank `R`.
    The head (`dense`) is the plan's. Without deltas this is the plan's adapter itself.
    """
    if not plan.merge:
        return plan.adapter
    extra = sorted({name for d in plan.merge for name in d.weights.factors} - plan.adapter.factors.keys())
    if extra:
        raise ExportError(f"a base delta names weights the adapter does not adapt: {extra[:3]}")
    factors = {}
    for name, own in plan.adapter.factors.items():
        parts = []
        for delta in sorted(plan.merge, key=lambda d: d.version):
            f = delta.weights.factors.get(name)
            if f is None:
                rank = delta.weights.rank
                f = LoraFactors(own.B.new_zeros(own.B.shape[0], rank), own.A.new_zeros(rank, own.A.shape[1]))
            parts.append(f)
        parts.append(own)
        factors[name] = LoraFactors(
            torch.cat([f.B.float() for f in parts], dim=1), torch.cat([f.A.float() for f in parts], dim=0)
        )
    return AdapterWeights(factors, dict(plan.adapter.dense))


def export_model(
    plan: ClientPlan,
    settings: Settings,
    out_dir: str | Path,
    *,
    merged: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the model `plan` describes as a PEFT adapter folder (or, `merged`, a plain `transformers`
    model folder) with the tokenizer, into `out_dir`, which must not exist or be empty.

    `settings` are the run's (its `config.toml`): the base model and dtype, the task (for the number of
    labels), the LoRA scale, dropout, target modules and `modules_to_save`, and the seed that initialised
    the base's new parameters. `provenance` (run directory, round, method, ...) is recorded in
    `hlora_export.json`. The folder appears whole or not at all: it is built beside `out_dir` and renamed.
    Raises ExportError for a destination in use or an adapter that does not fit the model, ModelError
    for a base model that cannot be loaded.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    task = get_task(settings.data.task)
    base = load_base(settings.model, task.num_labels, seed=settings.run.seed)
    adapter = flatten_plan(plan)
    base_name, base_folder = portable_model_name(settings.model.name_or_path)
    model = _peft_model(base, adapter, settings.lora, base_name)
    info = {
        "format": "merged" if merged else "peft-adapter",
        "task": task.name,
        "num_labels": task.num_labels,
        "max_length": settings.data.max_length,
        "dtype": settings.model.dtype,
        "base_model": base_name,  # as adapter_config.json names it
        **({"base_model_folder": str(base_folder)} if base_folder is not None else {}),
        "rank": adapter.rank,
        "adapter_rank": plan.adapter.rank,
        "base_delta_ranks": [d.weights.rank for d in sorted(plan.merge, key=lambda d: d.version)],
        "scale": settings.lora.scale,
        "seed": settings.run.seed,
        **dict(provenance or {}),
    }
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # not tempfile.mkdtemp: its folder is private (0700), and it becomes the user's export
    except OSError as e:
        raise ExportError(f"cannot create {out_dir}: {e.strerror or e}") from None
    try:
        with quiet_transformers():
            if merged:
                model.merge_and_unload().save_pretrained(tmp)
            else:  # the vocabulary is the base's: no need for PEFT to look the base up (on the hub)
                model.save_pretrained(tmp, save_embedding_layers=False)
            base.tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty, as checked above
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a folder taken meanwhile: the user's to fix
            raise ExportError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise
    return out_dir


def check_out_dir(out_dir: Path) -> None:
    """Refuse a destination that is a file or a folder with anything in it (exports never overwrite)."""
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise ExportError(f"{out_dir} exists and is not empty; exports never overwrite: choose another")
    elif out_dir.exists():
        raise ExportError(f"{out_dir} exists and is not a folder; choose another destination")


@torch.no_grad()
def _peft_model(base: LoadedBase, adapter: AdapterWeights, lora: LoraSettings, base_name: str) -> nn.Module:
    """`base` wrapped by PEFT with one adapter ("default") of `adapter`'s rank, the tensors copied in; the
    adapter's config and model card name the base `base_name`."""
    from peft import LoraConfig, TaskType, get_peft_model

    rank = adapter.rank
    # The base's new parameters that do not train keep their seeded values: save them with the adapter.
    untrained_new = sorted({k.rsplit(".", 1)[0] for k in base.new_parameters if k not in adapter.dense})
    modules_to_save = [*(lora.modules_to_save or []), *untrained_new]
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=lora.scale * rank,  # PEFT's scaling lora_alpha / r is `scale`, as in training
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=modules_to_save or None,  # None: PEFT adds the classifier, as in training
    )
    # PEFT's model card names the base by the model's and its config's names: a path of this machine
    base.model.name_or_path = base.model.config.name_or_path = base_name
    try:
        model = get_peft_model(base.model, config, adapter_name=_SLOT)
    except ValueError as e:
        raise ExportError(f"cannot add a LoRA adapter to {base.path}: {one_line(e)}") from None
    model.peft_config[_SLOT].base_model_name_or_path = base_name

    params = {name.removeprefix(_PEFT_PREFIX): p for name, p in model.named_parameters()}
    a_suffix, b_suffix = f".lora_A.{_SLOT}.weight", f".lora_B.{_SLOT}.weight"
    adapted = {name.removesuffix(a_suffix) for name in params if name.endswith(a_suffix)}
    if adapted != adapter.factors.keys():
        missing, extra = sorted(adapted - adapter.factors.keys()), sorted(adapter.factors.keys() - adapted)
        raise ExportError(f"the adapter does not fit {base.path}: missing {missing[:3]}, extra {extra[:3]}")
    saved = {
        name.replace(f".modules_to_save.{_SLOT}.", "."): p
        for name, p in params.items()
        if f".modules_to_save.{_SLOT}." in name
    }
    unknown = sorted(adapter.dense.keys() - saved.keys())
    if unknown:
        raise ExportError(f"the adapter's trained tensors {unknown[:3]} are not modules_to_save of the model")
    pairs = [(params[name + b_suffix], f.B) for name, f in adapter.factors.items()]
    pairs += [(params[name + a_suffix], f.A) for name, f in adapter.factors.items()]
    pairs += [(saved[name], t) for name, t in adapter.dense.items()]
    for param, tensor in pairs:
        if param.shape != tensor.shape:
            raise ExportError(
                f"the adapter does not fit {base.path}: a tensor of shape {tuple(tensor.shape)} "
                f"for a parameter of shape {tuple(param.shape)}"
            )
        param.copy_(tensor)
    return model


def _named_base(folder: Path, name: str, info: Mapping[str, Any]) -> str:
    """The base model an adapter names, or, where that was a local folder with no public name, the folder
    it came from if it is still there (else `name`, a folder relative to here, as `from_pretrained` reads
    it). Neither there: the user must say where their copy is."""
    recorded = info.get("base_model_folder")
    if not isinstance(recorded, str) or info.get("base_model") != name or Path(name).is_dir():
        return name
    if Path(recorded).is_dir():
        return recorded
    raise ModelError(
        f"the base model of {folder} was a local folder {name!r} ({recorded} where it was exported), "
        "which is not here: pass your copy of it (hlora eval --base FOLDER)"
    )


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded back from a folder, ready to score."""

    module: nn.Module
    tokenizer: object
    kind: str  # "peft-adapter" or "merged" (a plain transformers model folder)
    info: dict[str, Any]  # hlora_export.json, empty for a folder hlora did not write


def read_export_info(path: str | Path) -> dict[str, Any]:
    """`hlora_export.json` of an exported folder, or {} where there is none (a folder from elsewhere)."""
    file = Path(path) / EXPORT_INFO_FILE
    if not file.is_file():
        return {}
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {file}: {one_line(e)}") from None
    return info if isinstance(info, dict) else {}


def load_model_folder(
    path: str | Path,
    num_labels: int,
    device: torch.device | str = "cpu",
    *,
    base_model: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """A PEFT adapter folder loaded onto its base (`base_model`, default the one its config names), or
    a plain `transformers` model folder loaded as it is, with the folder's tokenizer (else the base's).

    The same two calls a user makes without hlora: `from_pretrained` of the base, then
    `PeftModel.from_pretrained`. Raises ModelError for a folder that is neither, or that does not load.
    """
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder: expected an exported adapter or model folder")
    info = read_export_info(path)
    dtype = dtype or info.get("dtype", "float32")
    if dtype not in get_args(ModelSettings.model_fields["dtype"].annotation):
        raise ModelError(f"{path / EXPORT_INFO_FILE}: unknown dtype {dtype!r}")
    is_adapter = (path / ADAPTER_CONFIG_FILE).is_file()
    if is_adapter:
        from peft import PeftConfig, PeftModel

        try:
            config = PeftConfig.from_pretrained(str(path))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ModelError(f"cannot read the PEFT adapter config in {path}: {one_line(e)}") from None
        name = base_model or config.base_model_name_or_path or ""
        if not name:
            raise ModelError(f"{path / ADAPTER_CONFIG_FILE} names no base model: pass the base model")
        base_path = resolve_model_path(name if base_model else _named_base(path, name, info))
    elif (path / "config.json").is_file():
        base_path = resolve_model_path(str(path))
    else:
        raise ModelError(
            f"{path} is neither a PEFT adapter folder ({ADAPTER_CONFIG_FILE}) nor a transformers model "
            "folder (config.json)"
        )
    # seed 0: nothing random should survive the load; if something does, it is repeatable
    with seeded_load(0):
        model, _ = load_classifier(base_path, num_labels, dtype)
        if is_adapter:
            try:
                model = PeftModel.from_pretrained(model, str(path))
            except LOAD_ERRORS as e:
                raise ModelError(
                    f"cannot load the adapter in {path} onto {base_path!r}: {one_line(e)}"
                ) from None
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(path) if has_tokenizer else base_path,
                local_files_only=local_only(base_path) or has_tokenizer,
            )
        except LOAD_ERRORS as e:
            raise ModelError(f"cannot load the tokenizer for {path}: {one_line(e)}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, "peft-adapter" if is_adapter else "merged", info)
