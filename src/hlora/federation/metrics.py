"""A round's record and a run's summary: the `metrics.jsonl` row the engine writes after each round
(`round_row`, `reliability_fields`), the line it prints (`round_line`), and what `summary.json` and the
accuracy plot make of the rows (`summarise`, `plot_accuracy`). Pure functions of rows: the report of
`hlora compare` reads the same rows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hlora.evaluation import CONSTANT_LOGITS, FLAT_FEATURES
from hlora.federation.server import RoundOutcome, RoundTraffic
from hlora.protocol import TrainResult


def round_row(
    rnd: int,
    scores: dict[str, float],
    tier_scores: dict[int, dict[str, float]],
    results: dict[int, TrainResult],
    sent: RoundTraffic,
    client_ranks: dict[int, int],
    timings: dict[str, float],
) -> dict[str, Any]:
    """One `metrics.jsonl` row: the global scores, each tier's (keyed by rank, as a string), the
    training loss, traffic, and each tier's cost (mean seconds per step over the tier's clients this
    round, the largest peak memory among them). `clients` are the round's sampled clients; loss and cost
    come from those whose reply arrived (`results`; the loss is None when none did). A figure that is
    None (missing: `hlora.federation.reports` refused it) is left out of the loss, the tier's mean or
    maximum and the sample count; a tier with none left has no entry."""
    ids = sorted(sent.downlink_bytes_by_client)
    replied = sorted(results)
    row: dict[str, Any] = {"round": rnd, **scores}
    if tier_scores:
        for metric in scores:  # accuracy, and F1 where the task has it
            row[f"tier_{metric}"] = {str(r): tier[metric] for r, tier in sorted(tier_scores.items())}
    by_tier: dict[int, list[TrainResult]] = {}
    for cid in sorted(replied, key=client_ranks.get):  # ranks ascending, so the tier keys come out in order
        by_tier.setdefault(client_ranks[cid], []).append(results[cid])
    loss = [(results[c].mean_loss, results[c].num_samples) for c in replied]
    loss = [(x, n) for x, n in loss if x is not None and n is not None]
    row.update(
        train_loss=float(np.average([x for x, _ in loss], weights=[n for _, n in loss])) if loss else None,
        uplink_bytes=sent.uplink_bytes,
        downlink_bytes=sent.downlink_bytes,
        clients=ids,
        client_ranks={str(cid): client_ranks[cid] for cid in ids},
        client_uplink_bytes={str(cid): n for cid, n in sorted(sent.uplink_bytes_by_client.items())},
        client_downlink_bytes={str(cid): n for cid, n in sorted(sent.downlink_bytes_by_client.items())},
        tier_step_s=_per_tier_figure(by_tier, "step_s", lambda v: round(float(np.mean(v)), 6)),
        tier_peak_bytes=_per_tier_figure(by_tier, "peak_bytes", max),
        tier_state_bytes=_per_tier_figure(by_tier, "state_bytes", max),
        train_samples=sum(results[c].samples_seen for c in replied if results[c].samples_seen is not None),
        **{name: round(seconds, 4) for name, seconds in timings.items()},
    )
    return row


def reliability_fields(
    outcome: RoundOutcome, lost: dict[int, str], corrupted: dict[int, str]
) -> dict[str, Any]:
    """The `metrics.jsonl` fields of what went wrong in a round (client ids as strings): which clients'
    updates went into the global model and the norm of the change each valid one made, the updates the
    server refused and why, the clients whose reply never came, whether the round failed, which
    updates were corrupted on purpose (`[faults]`), and the sample counts clients claimed that differ
    from their partition's size (which they were weighted by instead); and `instruments`, what the
    method made of the accepted updates (`aggregation.instruments`; null for a failed round)."""
    return {
        "aggregated_clients": [] if outcome.failed else list(outcome.accepted),
        "client_update_norm": {str(cid): round(n, 6) for cid, n in sorted(outcome.update_norms.items())},
        "misreported_samples": {str(cid): _number(n) for cid, n in sorted(outcome.misreported.items())},
        "rejected": {str(cid): why.code for cid, why in sorted(outcome.rejected.items())},
        "failed_clients": {str(cid): kind for cid, kind in sorted(lost.items())},
        "round_failed": outcome.failed,
        "corrupted_clients": {str(cid): kind for cid, kind in sorted(corrupted.items())},
        "instruments": outcome.instruments,
    }


def _number(n: Any) -> int | float:
    """A claimed sample count as JSON can hold it: an int stays an int, anything else is a float."""
    return int(n) if isinstance(n, (int, np.integer)) else float(n)


def _per_tier_figure(by_tier: dict[int, list[TrainResult]], figure: str, combine) -> dict[str, Any]:
    """`{rank: combine(the tier's values of figure)}` over the values that are not missing (None)."""
    values = {r: [v for v in (getattr(x, figure) for x in xs) if v is not None] for r, xs in by_tier.items()}
    return {str(r): combine(vs) for r, vs in values.items() if vs}


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The one line a finished round prints (`acc -` on a round not evaluated)."""
    acc = f"{row['accuracy']:.4f}" if "accuracy" in row else "-"
    f1 = f"  f1 {row['f1']:.4f}" if "f1" in row else ""
    tiers = row.get("tier_accuracy", {})
    tier_acc = "  tiers " + " ".join(f"r{r} {acc:.4f}" for r, acc in tiers.items()) if len(tiers) > 1 else ""
    loss = f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-"
    trouble = "".join(
        f"  {label} " + " ".join(f"c{cid} {why}" for cid, why in row[key].items())
        for label, key in (("rejected", "rejected"), ("lost", "failed_clients"))
        if row.get(key)
    )
    if row.get("invalid_reports"):
        trouble += "  bad figures " + " ".join(
            f"c{cid} {','.join(names)}" for cid, names in row["invalid_reports"].items()
        )
    if row.get("round_failed"):
        trouble += "  round failed: global model kept"
    spread = row.get("prediction_spread")
    if spread and max(spread["predicted_share"].values()) >= 1.0:  # scores the majority share, and dead
        same = spread["logit_std"] < CONSTANT_LOGITS
        trouble += "  every dev row one class" + (" (the same logits: blind to the input)" if same else "")
    last = last_layer_variation(row)
    if last is not None and last < FLAT_FEATURES:  # the encoder maps every row to one vector
        trouble += f"  last layer's features flat (vary {last:.1e})"
    privacy = row.get("privacy")
    if privacy:  # [privacy]: the epsilon spent so far (null: no noise, unbounded)
        eps = privacy["epsilon"]
        spent = f"  eps {eps:.3g}" if eps is not None else "  eps inf"
        clipped = "?" if privacy["clipped"] is None else privacy["clipped"]  # secure: the server cannot tell
        trouble = f"{spent} (clipped {clipped}/{privacy['aggregated']}){trouble}"
    return (
        f"round {row['round']:>3}/{rounds}  acc {acc}{f1}{tier_acc}  "
        f"loss {loss}  "
        f"up {row['uplink_bytes'] / 1e6:.2f} MB  down {row['downlink_bytes'] / 1e6:.2f} MB  "
        f"{row['wall_s']:.1f} s{trouble}"
    )


def summarise(rows: Sequence[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Best and final quality (global, and per rank tier where tiers were scored), totals over the run,
    each tier's cost (mean seconds per local step, largest peak memory), and failed rounds, refused
    updates by reason, lost clients by kind and client figures recorded as missing by name."""
    if not rows:
        return dict(extra, rounds=0)
    scored = evaluated_rows(rows)
    summary: dict[str, Any] = dict(extra)
    summary["rounds"] = len(rows)
    # the last round is always evaluated; a run stopped early ends on its last evaluated one
    final = scored[-1] if scored else {}
    if scored:
        best = max(scored, key=lambda r: (r["accuracy"], -r["round"]))
        summary.update(
            final_accuracy=final["accuracy"], best_accuracy=best["accuracy"], best_round=best["round"]
        )
    summary.update(
        total_uplink_bytes=sum(r["uplink_bytes"] for r in rows),
        total_downlink_bytes=sum(r["downlink_bytes"] for r in rows),
        total_wall_s=round(sum(r["wall_s"] for r in rows), 3),
    )
    if "f1" in final:
        summary["final_f1"] = final["f1"]
        summary["best_f1"] = max(r["f1"] for r in scored)
    for metric in ("accuracy", "f1"):
        if f"tier_{metric}" in final:
            summary[f"final_tier_{metric}"] = final[f"tier_{metric}"]
    step_s = _per_tier(rows, "tier_step_s")
    if step_s:
        summary["mean_tier_step_s"] = {r: round(sum(v) / len(v), 6) for r, v in step_s.items()}
    for key in ("peak_bytes", "state_bytes"):
        per_tier = _per_tier(rows, f"tier_{key}")
        if per_tier:
            summary[f"max_tier_{key}"] = {r: max(v) for r, v in per_tier.items()}
    if any("round_failed" in r for r in rows):  # what went wrong, totalled (hlora.federation.validation)
        summary["failed_rounds"] = sum(bool(r.get("round_failed")) for r in rows)
        summary["rejected_by_reason"] = _counts(rows, "rejected")
        summary["failed_clients_by_kind"] = _counts(rows, "failed_clients")
        summary["corrupted_by_kind"] = _counts(rows, "corrupted_clients")
    if rows[-1].get("privacy"):  # [privacy]: the (epsilon, delta) of the run's released models
        last = rows[-1]["privacy"]
        summary["privacy"] = {k: last[k] for k in ("epsilon", "delta", "noise_multiplier", "clip")}
        clipped = [r["privacy"]["clipped"] for r in rows if r.get("privacy")]
        # None: a secure run, whose server never sees a change (nor whether it was clipped)
        summary["privacy"]["clipped"] = None if None in clipped else sum(clipped)
    if any("invalid_reports" in r for r in rows):  # client figures recorded as missing (federation.reports)
        reports = (names for row in rows for names in row.get("invalid_reports", {}).values())
        names = Counter(name for names in reports for name in names)
        summary["invalid_reports_by_field"] = dict(sorted(names.items()))
    return summary


def evaluated_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the rounds whose global adapter was scored (`eval.every`): those with an accuracy.
    Rows written before `evaluated` existed were all scored, and all have one."""
    return [row for row in rows if "accuracy" in row]


def last_layer_variation(row: dict[str, Any]) -> float | None:
    """How much the last layer's features vary over the dev rows in an evaluated row
    (`prediction_spread.feature_variation`, `hlora.evaluation.Prediction`); None where not recorded."""
    variation = (row.get("prediction_spread") or {}).get("feature_variation")
    return float(variation[-1]) if variation else None


def failures_line(summary: dict[str, Any]) -> str | None:
    """`"1 failed round; rejected: nonfinite 2, norm 1; lost: crash 1"`, or None for a run where
    nothing went wrong."""
    parts = []
    if summary.get("failed_rounds"):
        parts.append(f"{summary['failed_rounds']} failed round{'s' if summary['failed_rounds'] > 1 else ''}")
    for label, key in (("rejected", "rejected_by_reason"), ("lost", "failed_clients_by_kind")):
        if summary.get(key):
            parts.append(f"{label}: " + ", ".join(f"{k} {n}" for k, n in summary[key].items()))
    return "; ".join(parts) or None


def privacy_line(summary: dict[str, Any]) -> str | None:
    """`"(epsilon 54.09, delta 0.0063) after 30 rounds, z 1, C 1; 212 updates clipped"` (and why the run
    stopped early, at its budget), or None for a run without [privacy]."""
    p = summary.get("privacy")
    if not p:
        return None
    eps = "unbounded (no noise)" if p["epsilon"] is None else f"{p['epsilon']:.4g}"
    clipped = "clipped by the clients" if p["clipped"] is None else f"{p['clipped']} updates clipped"
    line = (
        f"(epsilon {eps}, delta {p['delta']:.2g}) after {summary.get('rounds', '?')} rounds, "
        f"z {p['noise_multiplier']:g}, C {p['clip']:g}; {clipped}"
    )
    return f"{line}; stopped: {summary['stopped']}" if summary.get("stopped") else line


def _counts(rows: Sequence[dict[str, Any]], key: str) -> dict[str, int]:
    """`{value: how often}` over every round's `{client id: value}` field, values sorted."""
    return dict(sorted(Counter(v for row in rows for v in row.get(key, {}).values()).items()))


def _per_tier(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[Any]]:
    """`{rank: [value of each round the tier trained in]}` from a per-tier field, ranks ascending;
    missing values (None) left out."""
    values: dict[str, list[Any]] = {}
    for row in rows:
        for rank, value in row.get(key, {}).items():
            if value is not None:
                values.setdefault(rank, []).append(value)
    return dict(sorted(values.items(), key=lambda item: int(item[0])))


def plot_accuracy(
    rows: Sequence[dict[str, Any]], path: Path, title: str, baseline: float | None = None
) -> None:
    """Dev accuracy (and F1 where present) per evaluated round, with the majority-class baseline for
    scale; and, where more than one rank tier was scored, a thinner line for the accuracy each tier holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = evaluated_rows(rows)  # the rounds `eval.every` skipped have no point
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(rounds, [r["accuracy"] for r in rows], marker="o", label="dev accuracy")
    if rows and "f1" in rows[0]:
        ax.plot(rounds, [r["f1"] for r in rows], marker="s", linestyle="--", label="dev F1 (positive class)")
    tier_accuracy = _per_tier(rows, "tier_accuracy")
    if len(tier_accuracy) > 1 and all(len(v) == len(rows) for v in tier_accuracy.values()):
        for rank, accuracy in tier_accuracy.items():
            ax.plot(rounds, accuracy, linewidth=0.9, marker=".", alpha=0.8, label=f"rank {rank}")
    if baseline is not None and not math.isnan(baseline):
        ax.axhline(baseline, color="grey", linestyle=":", label=f"majority class ({baseline:.3f})")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
