"""Bad input from the user: one line naming the problem, exit status 2, and no run directory created or
changed. Run in a fresh working directory that already holds a `runs/` folder, which must stay as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlora.cli.main import main
from hlora.config import validate_settings
from hlora.export import export_model
from hlora.federation.prepared import prepare


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh cwd holding an earlier run under runs/ (the default parent of a new run directory)."""
    (tmp_path / "runs" / "earlier").mkdir(parents=True)
    (tmp_path / "runs" / "earlier" / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def bad_glue_dir(root: Path) -> Path:
    """A GLUE folder whose MRPC train.tsv has the wrong columns (its dev.tsv is fine)."""
    mrpc = root / "glue" / "MRPC"
    mrpc.mkdir(parents=True)
    (mrpc / "train.tsv").write_text("id\tsentence\tlabel\n1\tA sentence.\t1\n", encoding="utf-8")
    (mrpc / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA.\tB.\n")
    return root / "glue"


def fake_model_dir(root: Path, kind: str, model: Path | None = None) -> Path:
    """Not a model: a file, an empty folder, a config alone, an unreadable config; or, from `model`, a
    folder whose weights file is corrupt (a `kind` naming that file)."""
    path = root / f"model-{kind}"
    if kind == "file":
        path.write_text("not a model")
        return path
    if model is not None:
        shutil.copytree(model, path)
        for weights in path.glob("*.safetensors"):
            weights.unlink()
        (path / kind).write_bytes(b"\x80\x02garbage" * 8)  # neither a safetensors header nor a pickle
        return path
    path.mkdir()
    if kind in ("config-only", "garbage"):
        (path / "config.json").write_text("{" if kind == "garbage" else '{"model_type": "bert"}')
    if kind == "garbage":
        (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


# (the arguments after `run`, built in the work dir `d` from the tiny model `m`; a piece of the one line
# the user must see)
RUN_CASES = {
    "malformed TOML": (lambda d, m: ["-c", write(d / "c.toml", "[run\nseed = 1\n")], "is not valid TOML"),
    "unknown key": (
        lambda d, m: ["-c", write(d / "c.toml", "[lora]\nrnak = 4\n")],
        "unknown config key 'lora.rnak'",
    ),
    "unknown section": (
        lambda d, m: ["-c", write(d / "c.toml", "[bogus]\nx = 1\n")],
        "unknown config key 'bogus'",
    ),
    "wrong type": (
        lambda d, m: ["-c", write(d / "c.toml", '[federation]\nrounds = "many"\n')],
        "'federation.rounds'",
    ),
    "wrong type by --set": (lambda d, m: ["--set", "lora.scale=[1]"], "'lora.scale'"),
    "a section set as a value": (lambda d, m: ["--set", "lora=3"], "section.key=value"),
    "rank 0": (lambda d, m: ["--set", "lora.rank=0"], "'lora.rank'"),
    "tier rank 0": (
        lambda d, m: ["--set", "lora.rank_policy=tiers", "--set", "lora.tiers=[0, 2]"],
        "every tier rank must be >= 1",
    ),
    "unknown method": (lambda d, m: ["--set", "federation.method=fedavg"], "unknown method 'fedavg'"),
    "missing config file": (lambda d, m: ["-c", str(d / "missing.toml")], "config file not found"),
    "config path is a folder": (lambda d, m: ["-c", str(d)], "cannot read config file"),
    "config not UTF-8": (
        lambda d, m: ["-c", write(d / "c.toml", b"[run]\nname = '\xff'\n")],
        "cannot read config",
    ),
    "train.tsv with wrong columns": (
        lambda d, m: ["--data-dir", str(bad_glue_dir(d))],
        "train.tsv has no column '#1 String', '#2 String', 'Quality' for task mrpc",
    ),
    "missing data dir": (lambda d, m: ["--data-dir", str(d / "nowhere")], "does not exist"),
    "model path is a file": (
        lambda d, m: ["--set", f"model.name_or_path='{fake_model_dir(d, 'file')}'"],
        "is a file, not a transformers model folder",
    ),
    "model folder is empty": (
        lambda d, m: ["--set", f"model.name_or_path='{fake_model_dir(d, 'empty')}'"],
        "not a transformers model folder (no config.json)",
    ),
    "model folder has no weights": (
        lambda d, m: ["--set", f"model.name_or_path='{fake_model_dir(d, 'config-only')}'"],
        "holds no weights",
    ),
    "corrupt safetensors weights": (
        lambda d, m: ["--set", f"model.name_or_path='{fake_model_dir(d, 'model.safetensors', m)}'"],
        "cannot load a sequence-classification model",
    ),
    "corrupt pickled weights": (
        lambda d, m: ["--set", f"model.name_or_path='{fake_model_dir(d, 'pytorch_model.bin', m)}'"],
        "cannot load a sequence-classification model",
    ),
    "model folder is garbage": (
        lambda d, m: ["--set", f"model.name_or_path='{fake_model_dir(d, 'garbage')}'"],
        "cannot load",
    ),
    # Settings that once passed validation and then failed in round 1 or ran uselessly (exit 0).
    "lr inf": (lambda d, m: ["--set", "train.lr=inf"], "'train.lr': Input should be a finite number"),
    "head_lr nan": (lambda d, m: ["--set", "train.head_lr=nan"], "'train.head_lr'"),
    "scale inf": (lambda d, m: ["--set", "lora.scale=inf"], "'lora.scale': Input should be a finite"),
    "weight decay inf": (lambda d, m: ["--set", "train.weight_decay=inf"], "'train.weight_decay'"),
    "local epochs inf": (lambda d, m: ["--set", "train.local_epochs=inf"], "'train.local_epochs'"),
    "max grad norm inf": (lambda d, m: ["--set", "train.max_grad_norm=inf"], "'train.max_grad_norm'"),
    "negative seed": (lambda d, m: ["--set", "run.seed=-1"], "'run.seed'"),
    "seed beyond numpy's": (lambda d, m: ["--set", "run.seed=4294967296"], "'run.seed'"),
    "garbage device": (lambda d, m: ["--set", "run.device=garbage"], "run.device: unknown device 'garbage'"),
    "absent CUDA device": (lambda d, m: ["--set", "run.device='cuda:99'"], "run.device: 'cuda:99'"),
    "max_length above the model's positions": (
        lambda d, m: ["--set", "data.max_length=512"],
        "data.max_length 512 is above the 128 positions",
    ),
    "modules_to_save that match nothing": (
        lambda d, m: ["--set", "lora.modules_to_save=['nope']"],
        "lora.modules_to_save: 'nope' names no module",
    ),
    "target_modules one of which matches nothing": (
        lambda d, m: ["--set", "lora.target_modules=['query', 'nope']"],
        "lora.target_modules: 'nope' names no module",
    ),
    "target_modules that are no layers": (
        lambda d, m: ["--set", "lora.target_modules=['attention']"],
        "which is no layer LoRA can adapt",
    ),
    "rank above min(m, n)": (
        lambda d, m: ["--set", "lora.rank=33"],
        "lora.rank 33 is above min(m, n) = 32 of bert.encoder.layer.0.attention.self.query (32 x 32)",
    ),
    "rank 1e8": (lambda d, m: ["--set", "lora.rank=100000000"], "lora.rank 100000000 is above min(m, n)"),
    "tier rank above min(m, n)": (
        lambda d, m: ["--set", "lora.rank_policy=tiers", "--set", "lora.tiers=[2, 64]"],
        "lora.tiers rank 64 is above min(m, n) = 32",
    ),
    "bank rank above min(m, n)": (
        lambda d, m: ["--set", "lora.bank_rank=40"],
        "lora.bank_rank 40 is above min(m, n) = 32",
    ),
    "run name climbing out of runs/": (lambda d, m: ["--set", "run.name='../../x'"], "'run.name'"),
    "absolute run name": (lambda d, m: ["--set", f"run.name='{d / 'elsewhere'}'"], "'run.name'"),
    "run name with a folder": (lambda d, m: ["--set", "run.name='a/b'"], "'run.name'"),
    "run name dot-dot": (lambda d, m: ["--set", "run.name='..'"], "'run.name'"),
    "empty run name": (lambda d, m: ["--set", "run.name=''"], "'run.name'"),
}

if not torch.cuda.is_available():  # where there is one, "cuda" is a fine device
    RUN_CASES["CUDA on a machine without"] = (
        lambda d, m: ["--set", "run.device=cuda"],
        "run.device: 'cuda' asked for, but this machine has no CUDA device",
    )


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def base_args(tiny_model_dir, glue_dir) -> list[str]:
    """A tiny valid run, which each case then spoils (later --set and --data-dir win)."""
    return [
        "--set",
        f"model.name_or_path='{tiny_model_dir}'",
        "--data-dir",
        str(glue_dir),
        "--set",
        "data.max_train_samples=16",
        "--set",
        "data.max_eval_samples=8",
        "--set",
        "federation.num_clients=2",
        "--set",
        "federation.clients_per_round=2",
        "--set",
        "run.device='cpu'",
    ]


def run_main(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("out", [True, False], ids=["--out", "default-out"])
@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_run_input_is_one_line_exit_2_and_no_run_dir(
    workdir, tiny_model_dir, glue_dir, capsys, case, out
):
    build, message = RUN_CASES[case]
    before = snapshot(workdir / "runs")
    extra = build(workdir, tiny_model_dir)
    args = ["run", *base_args(tiny_model_dir, glue_dir), *extra]
    if out:
        args += ["--out", str(workdir / "new-run")]
    code, err = run_main(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hlora: error: ") and message in lines[0], err
    assert not (workdir / "new-run").exists()
    assert snapshot(workdir / "runs") == before


@pytest.mark.parametrize(
    "case", ["malformed TOML", "train.tsv with wrong columns", "model folder has no weights"]
)
def test_bad_input_prints_one_line_from_the_installed_command(workdir, tiny_model_dir, glue_dir, case):
    """The real process, not logging (no -q) nor warnings nor a traceback adds a line to stderr."""
    build, message = RUN_CASES[case]
    before = snapshot(workdir / "runs")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(workdir), "PYTHONPATH": str(src)}
    env.update({k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hlora",
            "run",
            *base_args(tiny_model_dir, glue_dir),
            *build(workdir, tiny_model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=workdir,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("hlora: error: "), proc.stderr
    assert message in proc.stderr
    assert snapshot(workdir / "runs") == before


@pytest.fixture(scope="module")
def exported(tiny_model_dir, glue_dir, tmp_path_factory) -> Path:
    settings = validate_settings(
        {
            "run": {"device": "cpu"},
            "data": {"data_dir": str(glue_dir), "max_train_samples": 16, "max_eval_samples": 8},
            "model": {"name_or_path": str(tiny_model_dir)},
            "federation": {"num_clients": 2, "clients_per_round": 2},
        }
    )
    exp = prepare(settings)
    return export_model(exp.server.model_plan(), settings, tmp_path_factory.mktemp("export") / "adapter")


EVAL_CASES = {
    "test split": (lambda d, a: ["-a", a, "--split", "test"], "GLUE hides the labels of the test split"),
    "unknown split": (lambda d, a: ["-a", a, "--split", "valid"], "unknown split 'valid'"),
    "unlabelled TSV": (
        lambda d, a: ["-a", a, "--tsv", str(Path(d) / "MRPC" / "test.tsv")],
        "has no label column 'Quality'",
    ),
    "missing TSV": (lambda d, a: ["-a", a, "--tsv", "nowhere.tsv"], "GLUE file not found"),
    "split and TSV": (lambda d, a: ["-a", a, "--split", "dev", "--tsv", "x.tsv"], "not both"),
    "unknown task": (lambda d, a: ["-a", a, "--task", "sst2"], "unknown GLUE task 'sst2'"),
    "not a folder": (lambda d, a: ["-a", "nowhere", "--task", "mrpc"], "is not a folder"),
    "neither adapter nor model": (
        lambda d, a: ["-a", ".", "--task", "mrpc"],
        "neither a PEFT adapter folder",
    ),
    "no task recorded": (lambda d, a: ["-a", "."], "--task is needed"),
    "unknown device": (lambda d, a: ["-a", a, "--device", "gpu"], "unknown device 'gpu'"),
    "existing JSON": (lambda d, a: ["-a", a, "--json", write(Path("s.json"), "{}")], "exists already"),
    "absent CUDA device": (lambda d, a: ["-a", a, "--device", "cuda:99"], "--device: 'cuda:99'"),
    "max length above the model's positions": (
        lambda d, a: ["-a", a, "--max-length", "512"],
        "--max-length 512 is above the 128 positions",
    ),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_bad_eval_input_is_one_line_exit_2(workdir, glue_dir, exported, capsys, case):
    build, message = EVAL_CASES[case]
    code, err = run_main(["eval", "--data-dir", str(glue_dir), *build(glue_dir, str(exported))], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hlora: error: ") and message in lines[0], err
