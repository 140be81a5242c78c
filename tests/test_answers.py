"""Reading whether a round's global model gave every dev row one class (`hlora.experiments.answers`)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score

from hlora.experiments import report
from hlora.experiments.answers import FROM_SCORES, RECORDED, one_class, one_class_from_scores, one_class_runs


@st.composite
def labelled(draw):
    """Two-class labels with a strict majority, and predictions: mixed, or every row one class."""
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=2, max_size=40)))
    if 2 * labels.sum() == len(labels):
        labels = np.append(labels, 1)
    majority = int(2 * labels.sum() > len(labels))
    kind = draw(st.sampled_from(["mixed", "majority", "minority"]))
    if kind == "mixed":
        predictions = np.array(draw(st.lists(st.integers(0, 1), min_size=len(labels), max_size=len(labels))))
    else:
        predictions = np.full(len(labels), majority if kind == "majority" else 1 - majority)
    return labels, predictions, majority


@settings(deadline=None, derandomize=True, max_examples=400)
@given(labelled())
def test_the_scores_never_misread_a_model_and_always_find_the_majority_class(case):
    labels, predictions, majority = case
    share = max(labels.mean(), 1 - labels.mean())
    accuracy = accuracy_score(labels, predictions)
    f1 = f1_score(labels, predictions, pos_label=1, zero_division=0)
    read = one_class_from_scores(accuracy, f1, share)
    every_row_one_class = len(set(predictions.tolist())) == 1
    if read is True:
        assert every_row_one_class and predictions[0] == majority
    if read is False:
        assert not every_row_one_class
    if every_row_one_class and predictions[0] == majority:
        assert read is True  # the case that matters is never left undecided
    if read is None:  # only the minority's share with an F1 a one-class model has
        assert np.isclose(accuracy, 1 - share)


def test_the_scores_decide_nothing_without_f1_or_a_majority():
    assert one_class_from_scores(0.6838, None, 0.6838) is None
    assert one_class_from_scores(0.5, 0.0, 0.5) is None
    assert one_class_from_scores(0.6838, 0.8122, None) is None


def test_mrpc_dev_all_paraphrase_is_read_as_one_class():
    # 279 of 408 dev pairs are paraphrases (positive): calling every pair one scores these
    share = 279 / 408
    assert one_class_from_scores(share, 2 * 279 / (2 * 279 + 129), share) is True
    assert one_class_from_scores(0.6887, 0.8146, share) is False


def test_a_recorded_spread_is_read_before_the_scores():
    row = {"accuracy": 0.7, "f1": 0.8, "prediction_spread": {"predicted_share": {"0": 0.0, "1": 1.0},
                                                             "logit_std": 0.0}}  # fmt: skip
    assert one_class(row, 0.6838) == (True, RECORDED)
    row["prediction_spread"]["predicted_share"] = {"0": 0.01, "1": 0.99}
    assert one_class(row, 0.6838) == (False, RECORDED)
    assert one_class({"accuracy": 0.7, "f1": 0.8}, 0.6838) == (False, FROM_SCORES)


def _row(round_: int, predicted_one: float | None, logit_std: float = 1.0, evaluated: bool = True) -> dict:
    if not evaluated:
        return {"round": round_, "evaluated": False}
    row = {"round": round_, "accuracy": 0.7, "f1": 0.8, "evaluated": True}
    if predicted_one is not None:
        row["prediction_spread"] = {"predicted_share": {"0": 1 - predicted_one, "1": predicted_one},
                                    "logit_std": logit_std}  # fmt: skip
    return row


def test_each_run_counts_its_one_class_rounds_and_where_the_last_stretch_began():
    dead = [_row(1, 0.6), _row(2, 1.0, 0.0), _row(3, 0.7), _row(4, 1.0, 1e-6), _row(5, None, evaluated=False),
            _row(6, 1.0, 0.2)]  # fmt: skip
    alive = [_row(1, 0.6), _row(2, 1.0), _row(3, 0.7)]
    runs = [report.SeedRun("hlora", 1, dead, 0.6838), report.SeedRun("zeropad", 1, alive, 0.6838),
            report.SeedRun("local", 0, dead, 0.6838)]  # fmt: skip
    found = one_class_runs(runs)
    assert [(r.group, r.evaluated, r.one_class, r.since, r.same_logits) for r in found] == [
        ("hlora", 5, 3, 4, 2), ("zeropad", 3, 1, None, 0)]  # the local reference's rows are client means
    lines = "\n".join(report.one_class_lines(found))
    assert "| hlora | 1 | 3 of 5 | 4 | 2 of 5 | - | recorded |" in lines
    assert "| zeropad | 1 | 1 of 3 | - | 0 of 3 | - | recorded |" in lines


def test_rounds_whose_last_layer_is_flat_are_counted_where_recorded():
    rows = [_row(1, 0.6), _row(2, 1.0, 0.0), _row(3, 1.0, 0.0)]
    rows[1]["prediction_spread"]["feature_variation"] = [0.5, 0.1, 0.02]
    rows[2]["prediction_spread"]["feature_variation"] = [0.5, 1e-3, 4e-7]  # round 1 predates the record
    (found,) = one_class_runs([report.SeedRun("hlora", 2, rows, 0.6838)])
    assert found.flat_features == (1, 2)
    lines = "\n".join(report.one_class_lines([found]))
    assert "| hlora | 2 | 2 of 3 | 2 | 2 of 3 | 1 of 2 | recorded |" in lines


def test_the_section_says_none_where_no_round_is_one_class_and_is_absent_where_none_can_be_read():
    alive = report.SeedRun("hlora", 0, [_row(1, 0.6)], 0.6838)
    assert "None: in every evaluated round" in "\n".join(report.one_class_lines(one_class_runs([alive])))
    unread = report.SeedRun("hlora", 0, [{"round": 1, "accuracy": 0.7, "evaluated": True}], 0.6838)
    assert report.one_class_lines(one_class_runs([unread])) == []
