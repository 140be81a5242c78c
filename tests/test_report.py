"""The report asks the registry, never a method's name: the order of its groups, the label of the
fixed-rank references, and the subject of its paired table."""

from __future__ import annotations

from hlora.aggregation import registry
from hlora.experiments import report
from hlora.federation import metrics


def test_groups_follow_the_registry_order_then_the_references() -> None:
    ref = registry.reference()
    first, second = registry.ordered()[:2]
    groups = ["local", f"{ref}-r16", "central", "unregistered", f"{ref}-r2", second, f"{first}-r2", first]
    assert sorted(groups, key=report.group_order) == [
        first, f"{first}-r2", second, "unregistered", "central", f"{ref}-r2", f"{ref}-r16", "local",
    ]  # fmt: skip
    assert report.is_reference(f"{ref}-r2") and not report.is_reference(f"{first}-r2")


def test_fixed_rank_references_are_labelled_by_their_rule() -> None:
    assert report.label("fedit-r4") == "FedIT r=4 (ref.)"  # the committed reports' wording, from the class
    assert report.label("central") == "centralised (upper ref.)"


def test_the_subject_is_the_first_method_present_in_registry_order() -> None:
    ordered = registry.ordered()
    assert report.subject_of(["central", *reversed(ordered)]) == ordered[0]
    assert report.subject_of(["central", ordered[2], ordered[1]]) == ordered[1]
    assert report.subject_of(["central", "local"]) is None


def test_legends_name_the_seeds_only_where_the_groups_differ_in_them() -> None:
    def runs(**seeds: int) -> list[report.SeedRun]:
        return [report.SeedRun(group, seed, []) for group, n in seeds.items() for seed in range(n)]

    assert report.seed_labels(runs(hlora=3, zeropad=3)) == {"hlora": "hlora", "zeropad": "zeropad"}
    assert report.seed_labels(runs(hlora=2, flexlora=1, central=1)) == {
        "hlora": "hlora (2 seeds)",
        "flexlora": "flexlora (1 seed)",
        "central": "centralised (upper ref.) (1 seed)",
    }


def _rows(aggregate_s: float, aggregate_cpu_s: float | None) -> list[dict]:
    row = {"round": 1, "accuracy": 0.7, "uplink_bytes": 10, "downlink_bytes": 10, "wall_s": 5.0,
           "aggregate_s": aggregate_s}  # fmt: skip
    if aggregate_cpu_s is not None:
        row["aggregate_cpu_s"] = aggregate_cpu_s
    return [row]


def test_aggregation_pairs_the_median_rounds_in_cpu_seconds_where_both_runs_record_them() -> None:
    runs = [
        # seed 0: both record CPU time; zero-padding's wall time holds a pause (600 s stopped)
        report.SeedRun("hlora", 0, _rows(2.0, 2.0)), report.SeedRun("zeropad", 0, _rows(600.5, 0.5)),
        # seed 1: one run predates the CPU figure: both in wall seconds, and one paused round of three
        # does not move the median
        report.SeedRun("hlora", 1, _rows(4.0, 3.0) * 3),
        report.SeedRun("zeropad", 1, _rows(1.0, None) * 2 + _rows(900.0, None)),
    ]  # fmt: skip
    (row,) = report.paired_table(runs, None, "hlora")
    assert row["aggregate_ratio"] == (0.5 / 2.0 + 1.0 / 4.0) / 2


def test_the_seed_chart_has_a_panel_per_seed_and_crosses_rounds_that_give_one_class(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, **kwargs):
        drawn.append((self, kwargs.get("marker"), list(x)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    majority = 279 / 408  # MRPC dev: every pair called a paraphrase scores this, with F1 2m/(1+m)
    dead = {"accuracy": majority, "f1": 2 * majority / (1 + majority)}

    def rows(*scores: dict) -> list[dict]:
        return [{"round": n, **score} for n, score in enumerate(scores, start=1)]

    alive = {"accuracy": 0.75, "f1": 0.83}
    runs = [report.SeedRun("hlora", 0, rows(alive, alive), majority),
            report.SeedRun("hlora", 1, rows(alive, dead), majority),
            report.SeedRun("local", 1, rows(dead, dead), majority)]  # fmt: skip
    path = report._plot_by_seed(runs, tmp_path, {"hlora": 0, "local": 1}, majority, "MRPC")
    assert path.read_bytes().startswith(b"\x89PNG")
    panels = list(dict.fromkeys(ax for ax, _, _ in drawn))
    assert [ax.get_title() for ax in panels] == ["seed 0", "seed 1"]
    crosses = [(panels.index(ax), x) for ax, marker, x in drawn if marker == "x"]
    assert crosses == [(1, [2])]  # seed 1's dead round, and not the local reference's mean rows


def test_the_feature_chart_draws_the_last_layer_of_the_rounds_that_recorded_it(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, **kwargs):
        drawn.append((self, list(x), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)

    def row(n: int, variation: list[float] | None) -> dict:
        spread = {"predicted_share": {"0": 0.3, "1": 0.7}, "logit_std": 0.5}
        if variation is not None:
            spread["feature_variation"] = variation
        return {"round": n, "accuracy": 0.7, "prediction_spread": spread}

    older = report.SeedRun("zeropad", 0, [row(1, None), row(2, None)])  # made before rounds recorded it
    assert report.plot_features([older], tmp_path, {"task": "mrpc"}) == []
    runs = [
        older,
        report.SeedRun("hlora", 0, [row(1, [0.5, 0.3]), {"round": 2, "evaluated": False},
                                    row(3, [0.5, 2e-7])]),  # fmt: skip
        report.SeedRun("hlora", 2, [row(1, [0.5, 0.4])]),
        report.SeedRun("local", 2, [row(1, [0.5, 0.9])]),  # means over clients: not drawn
    ]
    (path,) = report.plot_features(runs, tmp_path, {"task": "mrpc"})
    assert path.name == report.PLOT_FEATURES and path.read_bytes().startswith(b"\x89PNG")
    lines = [(ax.get_title(), x, [float(v) for v in y]) for ax, x, y in drawn]
    assert lines == [("seed 0", [1, 3], [0.3, 2e-7]), ("seed 2", [1], [0.4])]  # the older run has none
    assert metrics.last_layer_variation(row(1, [0.5, 0.25])) == 0.25
    assert metrics.last_layer_variation(row(1, None)) is None
