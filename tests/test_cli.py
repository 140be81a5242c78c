"""The command line: a run from a config, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hlora.cli.main import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cli(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "hlora", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    return proc.returncode, proc.stdout, proc.stderr


def tiny_args(tiny_model_dir, glue_dir) -> list[str]:
    return [
        "--set",
        f"model.name_or_path='{tiny_model_dir}'",
        "--data-dir",
        str(glue_dir),
        "--set",
        "data.max_train_samples=32",
        "--set",
        "data.max_eval_samples=16",
        "--set",
        "federation.num_clients=2",
        "--set",
        "federation.clients_per_round=2",
        "--set",
        "federation.rounds=1",
        "--set",
        "train.local_steps=1",
        "--set",
        "run.device='cpu'",
    ]


def test_run_prints_per_round_accuracy(tiny_model_dir, glue_dir, tmp_path):
    code, out, err = cli(
        "run",
        "-c",
        str(CONFIGS / "mrpc-fedit.toml"),
        "--out",
        str(tmp_path / "run"),
        "-q",
        *tiny_args(tiny_model_dir, glue_dir),
    )
    assert code == 0, err
    assert "round   1/1  acc " in out
    assert "done: final accuracy" in out
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_the_main_job_trains_mixed_ranks_with_hlora_and_prints_each_tier(tiny_model_dir, glue_dir, tmp_path):
    # `make run`'s config, on the tiny model: three clients of ranks 4, 8 and 16, HLoRA, and the last
    # round's line says what each tier holds.
    code, out, err = cli(
        "run",
        "-c",
        str(CONFIGS / "mrpc.toml"),
        "--out",
        str(tmp_path / "run"),
        "-q",
        *tiny_args(tiny_model_dir, glue_dir),
        "--set",
        "federation.num_clients=3",
        "--set",
        "federation.clients_per_round=3",
        "--set",
        "data.max_train_samples=48",
    )
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("round   1/1")]
    assert " tiers r4 " in line and " r8 " in line and " r16 " in line, line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "hlora" and summary["client_ranks"] == [4, 8, 16]
    assert summary["bank_rank"] == 16 and set(summary["final_tier_accuracy"]) == {"4", "8", "16"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "federation.method=nope"], "unknown method 'nope'"),
        (["--set", "lora.rank=0"], "'lora.rank'"),
        (["--set", "train.lr"], "section.key=value"),
        (["--data-dir", "/nonexistent/glue"], "/nonexistent/glue"),
        (["--set", "model.name_or_path='/tmp'"], "not a transformers model folder"),
        (["--set", "lora.bank_rank=2"], "bank_rank (2) is below the largest client rank (8"),
        (["--set", "method_options.norm_weighting=true"], "method_options.norm_weighting"),
        (["--set", "lora.rank_policy=tiers", "--set", "lora.tiers=[1, 2]"], "method for mixed ranks"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(
    tiny_model_dir, glue_dir, tmp_path, capsys, extra, message
):
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(
            [
                "run",
                "-c",
                str(CONFIGS / "mrpc-fedit.toml"),
                "--out",
                str(out_dir),
                "-q",
                *tiny_args(tiny_model_dir, glue_dir),
                *extra,
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hlora: error: ") and "\n" not in err and message in err, err
    assert not out_dir.exists()


def test_missing_config_file_and_existing_run_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "-c", str(tmp_path / "missing.toml")])
    assert info.value.code == 2
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["run", "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "exists already" in capsys.readouterr().err


def test_methods_lists_fedit(capsys):
    with pytest.raises(SystemExit) as info:
        main(["methods"])
    assert info.value.code == 0
    assert "fedit" in capsys.readouterr().out.split()


def test_eval_of_a_plain_model_whose_tokenizer_has_no_pad_token_pads_with_eos(tmp_path, glue_dir, capsys):
    """A merged GPT-2 style folder (no pad token in its tokenizer) is scored, padded with its eos token."""
    from tests.test_lora_model import gpt2_dir

    model = gpt2_dir(tmp_path, eos=True)
    args = ["eval", "-a", str(model), "--task", "mrpc", "--data-dir", str(glue_dir), "--max-samples", "8"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--device", "cpu", "--batch-size", "4", "-q"])
    out = capsys.readouterr()
    assert info.value.code in (0, None), out.err
    assert "(8 rows, merged" in out.out and "accuracy" in out.out
