"""A federated run beside its centralised reference, given the same number of training samples.

Runs `hlora run` twice with one config, once as configured and once with `run.mode=centralized` (one
client holding all the data; each round it sees as many samples as all the federated clients together
in a round), then writes a table (CSV and Markdown) and one chart of dev accuracy per round.

    python benchmarks/federated_vs_central.py configs/mrpc.toml --rounds 10 \
        --out benchmarks/results/mrpc-fedit-r8
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hlora.federation.metrics import evaluated_rows
from hlora.rundir import read_metrics  # noqa: E402


def hlora_run(config: str, out: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "hlora", "run", "-c", config, "--out", str(out), "-q"]
    for o in overrides:
        cmd += ["--set", o]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True, help="folder for the table and chart (small files)")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the two run directories go")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    common = [f"federation.rounds={args.rounds}", *args.overrides]
    runs = {
        "federated": args.runs / f"{args.out.name}-federated",
        "centralized": args.runs / f"{args.out.name}-central",
    }
    for mode, path in runs.items():
        if not (path / "summary.json").exists():
            hlora_run(args.config, path, [*common, f"run.mode={mode}"])

    rows = {mode: read_metrics(path) for mode, path in runs.items()}
    summaries = {mode: json.loads((path / "summary.json").read_text()) for mode, path in runs.items()}
    has_f1 = "f1" in rows["federated"][-1]  # the last round is always evaluated
    table = args.out / "per_round.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "round",
                "samples",
                "fed_accuracy",
                "fed_f1",
                "central_accuracy",
                "central_f1",
                "fed_wall_s",
                "central_wall_s",
            ]
        )
        samples = 0
        for fr, cr in zip(rows["federated"], rows["centralized"], strict=True):
            samples += fr["train_samples"]
            if "accuracy" not in fr or "accuracy" not in cr:  # a round eval.every skipped
                continue
            w.writerow(
                [
                    fr["round"],
                    samples,
                    fr["accuracy"],
                    fr.get("f1", ""),
                    cr["accuracy"],
                    cr.get("f1", ""),
                    fr["wall_s"],
                    cr["wall_s"],
                ]
            )

    lines = [
        "| round | train samples | federated acc | federated F1 | centralised acc | centralised F1 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    samples = 0
    for fr, cr in zip(rows["federated"], rows["centralized"], strict=True):
        samples += fr["train_samples"]
        if "accuracy" not in fr or "accuracy" not in cr:
            continue
        f1 = (f"{fr['f1']:.4f}", f"{cr['f1']:.4f}") if has_f1 else ("", "")
        lines.append(
            f"| {fr['round']} | {samples} | {fr['accuracy']:.4f} | {f1[0]} | {cr['accuracy']:.4f} | {f1[1]} |"
        )
    for mode, s in summaries.items():
        lines.append("")
        lines.append(
            f"{mode}: final accuracy {s['final_accuracy']:.4f}, best {s['best_accuracy']:.4f} (round "
            f"{s['best_round']}), wall {s['total_wall_s']:.0f} s, up {s['total_uplink_bytes'] / 1e6:.1f} MB, "
            f"down {s['total_downlink_bytes'] / 1e6:.1f} MB"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for mode, style in (("federated", "o-"), ("centralized", "s--")):
        scored = evaluated_rows(rows[mode])
        ax.plot([r["round"] for r in scored], [r["accuracy"] for r in scored], style, label=mode)
    ax.axhline(
        summaries["federated"]["majority_baseline"], color="grey", linestyle=":", label="majority class"
    )
    ax.set_xlabel("round (same training samples per round in both)")
    ax.set_ylabel("dev accuracy")
    ax.set_title(
        f"{summaries['federated']['task'].upper()}: {summaries['federated']['num_clients']} clients "
        f"({summaries['federated']['method']}) vs centralised"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(args.out / "accuracy.png")
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
