"""GLUE loading: the shared TSV files read exactly as the README describes, and clear errors otherwise.

Nothing here touches the network: the hub is either turned off or replaced by a fake `datasets` module.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from hlora.data import glue
from hlora.data.glue import TASKS, TextPairs, find_glue_dir, get_task, load_split, read_glue_tsv
from hlora.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]

# The README table of /work/shared/glue (QQP train: 20,497 rows, one of them malformed and skipped).
ROWS = {
    ("mrpc", "train"): 3668, ("mrpc", "dev"): 408,
    ("rte", "train"): 2490, ("rte", "dev"): 277,
    ("qqp", "train"): 20496, ("qqp", "dev"): 3000,
}
LABEL_COUNTS = {
    ("mrpc", "train"): {"equivalent": 2474, "not_equivalent": 1194},
    ("mrpc", "dev"): {"equivalent": 279, "not_equivalent": 129},
    ("rte", "train"): {"entailment": 1249, "not_entailment": 1241},
    ("rte", "dev"): {"entailment": 146, "not_entailment": 131},
}


@pytest.fixture(scope="module")
def shared_glue() -> Path:
    """The shared GLUE folder, found the way a run from the repository root finds it."""
    with contextlib.chdir(REPO_ROOT):
        found = find_glue_dir()
    if found is None:
        # CI always has ../shared beside the checkout: a missing folder is a broken set-up, not a skip.
        pytest.fail("no shared GLUE folder found from the repository root (expected ../shared/glue)")
    return found


@pytest.fixture(scope="module")
def splits(shared_glue) -> dict[tuple[str, str], TextPairs]:
    return {(t, s): load_split(t, s, shared_glue) for t, s in ROWS}


def write_tsv(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def hlora_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hlora.data" and r.levelno == logging.WARNING]


# --- the shared files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "split"), list(ROWS))
def test_row_counts_match_readme(splits, task, split):
    pairs = splits[task, split]
    assert len(pairs) == ROWS[task, split]
    assert len(pairs.text_a) == len(pairs.text_b) == len(pairs.labels)
    assert pairs.labels.dtype == np.int64
    assert Path(pairs.source).name == f"{split}.tsv"


@pytest.mark.parametrize(("task", "split"), list(LABEL_COUNTS))
def test_label_counts_match_readme(splits, task, split):
    spec = get_task(task)
    counts = np.bincount(splits[task, split].labels, minlength=spec.num_labels)
    assert dict(zip(spec.label_names, counts.tolist(), strict=True)) == LABEL_COUNTS[task, split]


def test_qqp_labels_are_binary(splits):
    for split in ("train", "dev"):
        labels = splits["qqp", split].labels
        assert set(np.unique(labels).tolist()) == {0, 1}


def test_mrpc_bom_header_is_handled(shared_glue, splits):
    path = shared_glue / "MRPC" / "train.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbfQuality\t")  # the BOM really is there
    assert len(splits["mrpc", "train"]) == ROWS["mrpc", "train"]  # and "Quality" was still found


def test_bare_quotes_survive_verbatim(shared_glue, splits):
    """Every MRPC text equals its raw field byte for byte: no quote processing, no stripping."""
    pairs = splits["mrpc", "train"]
    raw = (shared_glue / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    fields = [line.split("\t") for line in raw]
    assert pairs.text_a == [f[3] for f in fields]
    assert pairs.text_b == [f[4] for f in fields]
    quoted = [t for t in pairs.text_a + pairs.text_b if '"' in t]
    assert quoted, "expected texts with bare quotes in MRPC train"
    assert 'Amrozi accused his brother, whom he called "the witness", of deliberately' in pairs.text_a[0]
    # An unbalanced quote: a quoting reader would swallow the following rows into this field.
    dev_b = splits["mrpc", "dev"].text_b[0]
    assert dev_b.startswith('"The foodservice pie business') and dev_b.count('"') == 1


def test_malformed_qqp_row_is_skipped_with_one_warning(shared_glue, caplog):
    path = shared_glue / "QQP" / "train.tsv"
    with caplog.at_level(logging.WARNING, logger="hlora.data"):
        pairs = read_glue_tsv(path, get_task("qqp"))
    assert len(pairs) == 20496
    messages = hlora_warnings(caplog)
    assert len(messages) == 1
    assert "skipped 1 malformed row(s) of 20497" in messages[0]
    assert str(path) in messages[0] and "line 2: 5 fields, expected 6" in messages[0]
    assert "\n" not in messages[0]


def test_clean_files_log_no_warning(shared_glue, caplog):
    with caplog.at_level(logging.WARNING, logger="hlora.data"):
        load_split("rte", "dev", shared_glue)
    assert hlora_warnings(caplog) == []


# --- tasks and TextPairs ------------------------------------------------------------------------------


def test_task_specs():
    assert get_task("MRPC") is TASKS["mrpc"] and get_task(" Rte ") is TASKS["rte"]
    rte = get_task("rte")
    assert rte.label_names[0] == "entailment" and rte.tsv_labels == {"entailment": 0, "not_entailment": 1}
    assert not rte.has_f1 and rte.positive_label is None
    for name in ("mrpc", "qqp"):
        spec = get_task(name)
        assert spec.num_labels == 2 and spec.has_f1 and spec.positive_label == 1
        assert spec.tsv_labels == {"0": 0, "1": 1}
    assert get_task("qqp").hub_text_fields == ("question1", "question2")
    hash(get_task("mrpc"))  # usable as a dict key


def test_unknown_task_names_the_known_ones():
    with pytest.raises(DataError, match="sst2.*mrpc, qqp, rte"):
        get_task("sst2")
    with pytest.raises(DataError, match="unknown GLUE task"):
        load_split("cola", "train")


def test_text_pairs_head_and_subset():
    pairs = TextPairs(["a", "b", "c"], ["x", "y", "z"], np.array([0, 1, 0], dtype=np.int64), "src")
    assert pairs.head(2).text_a == ["a", "b"] and len(pairs.head(2)) == 2
    for n in (None, 0, -1, 10):
        assert len(pairs.head(n)) == 3
    sub = pairs.subset(np.array([2, 0]))
    assert sub.text_a == ["c", "a"] and sub.text_b == ["z", "x"] and sub.labels.tolist() == [0, 0]
    assert sub.source == "src"
    single = TextPairs(["a"], None, np.array([1], dtype=np.int64), "src")
    assert single.subset([0]).text_b is None


# --- bad files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "MRPC" / "train.tsv"
    with pytest.raises(DataError, match="not found") as err:
        read_glue_tsv(path, get_task("mrpc"))
    assert str(path) in str(err.value)


def test_missing_column_names_file_column_and_columns_found(tmp_path):
    path = write_tsv(tmp_path / "bad.tsv", ["Label\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\ta\tb"])
    with pytest.raises(DataError) as err:
        read_glue_tsv(path, get_task("mrpc"))
    message = str(err.value)
    assert str(path) in message and "'Quality'" in message and "'Label'" in message
    assert "\n" not in message


def test_bom_quotes_bad_rows_in_small_file(tmp_path, caplog):
    path = write_tsv(
        tmp_path / "rte.tsv",
        [
            "index\tsentence1\tsentence2\tlabel",
            '0\tHe said "yes\tIt is "so".\tentailment',
            "1\tshort row\tentailment",
            "2\tunknown label\tb\tneutral",
            "3\t   \tempty first text\tnot_entailment",
            "4\tok\tfine\tnot_entailment",
        ],
        bom=True,
    )
    with caplog.at_level(logging.WARNING, logger="hlora.data"):
        pairs = read_glue_tsv(path, get_task("rte"))
    assert pairs.text_a == ['He said "yes', "ok"] and pairs.text_b == ['It is "so".', "fine"]
    assert pairs.labels.tolist() == [0, 1]
    messages = hlora_warnings(caplog)
    assert len(messages) == 1
    assert "skipped 3 malformed row(s) of 5" in messages[0] and "line 3: 3 fields, expected 4" in messages[0]


def test_file_with_no_usable_row(tmp_path):
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    header_only = write_tsv(tmp_path / "a.tsv", [header])
    with pytest.raises(DataError, match="no usable row"):
        read_glue_tsv(header_only, get_task("qqp"))
    all_bad = write_tsv(tmp_path / "b.tsv", [header, "1\t2\t3\tq"])
    with pytest.raises(DataError, match=r"no usable row.*line 2: 4 fields"):
        read_glue_tsv(all_bad, get_task("qqp"))
    empty = write_tsv(tmp_path / "c.tsv", [])
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_glue_tsv(empty, get_task("qqp"))


def test_missing_task_folder_or_split_file(tmp_path):
    write_tsv(tmp_path / "RTE" / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    assert len(load_split("rte", "train", tmp_path)) == 1
    with pytest.raises(DataError, match="dev.tsv"):
        load_split("rte", "dev", tmp_path)
    with pytest.raises(DataError, match="no MRPC sub-folder"):
        load_split("mrpc", "train", tmp_path)


def test_test_split_is_refused(shared_glue):
    with pytest.raises(DataError, match="hides the labels"):
        load_split("mrpc", "test", shared_glue)
    with pytest.raises(DataError, match="unknown split"):
        load_split("mrpc", "validation-ish", shared_glue)


# --- finding the folder, and the hub ------------------------------------------------------------------


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Path:
    """A cwd with no GLUE copy in reach: default candidates relative to tmp_path only, no env var."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("HLORA_GLUE_DIR", raising=False)
    candidates = [cwd / ".." / "shared" / "glue", cwd / "shared" / "glue"]
    monkeypatch.setattr(glue, "default_glue_candidates", lambda: candidates)
    return cwd


def test_offline_without_local_copy(nowhere, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert find_glue_dir() is None
    with pytest.raises(DataError) as err:
        load_split("mrpc", "train")
    message = str(err.value)
    assert message.startswith("no local GLUE copy found (looked in: ")
    assert "HF_HUB_OFFLINE" in message and "--data-dir" in message and "HLORA_GLUE_DIR" in message
    assert "\n" not in message


def test_hub_turned_off_or_failing(nowhere, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def failing(spec, split):
        raise ConnectionError("cannot reach huggingface.co\nsecond line")

    monkeypatch.setattr(glue, "_load_from_hub", failing)
    with pytest.raises(DataError, match="hub loading is turned off"):
        load_split("rte", "dev", allow_hub=False)
    with pytest.raises(DataError, match="ConnectionError: cannot reach huggingface.co") as err:
        load_split("rte", "dev")
    assert "\n" not in str(err.value)


def test_hub_rows_are_mapped(nowhere, monkeypatch):
    """With no local copy the hub dataset is used (here a fake `datasets` module): dev -> validation."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"question1": ["q1", "q2", "q3"], "question2": ["p1", "p2", "p3"], "label": [1, -1, 0]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pairs = load_split("QQP", "dev")
    assert calls == [("nyu-mll/glue", "qqp", "validation")]
    assert pairs.text_a == ["q1", "q3"] and pairs.text_b == ["p1", "p3"] and pairs.labels.tolist() == [1, 0]
    assert pairs.source == "nyu-mll/glue/qqp:validation"


def test_explicit_dir_must_exist_and_hold_a_task(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError, match="does not exist") as err:
        find_glue_dir(missing)
    assert str(missing) in str(err.value)
    with pytest.raises(DataError, match="no-such-dir"):
        load_split("mrpc", "train", missing)
    with pytest.raises(DataError, match="no task sub-folder"):
        find_glue_dir(tmp_path)


def test_env_var_is_used_and_checked(tmp_path, monkeypatch):
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    monkeypatch.setenv("HLORA_GLUE_DIR", str(tmp_path / "glue"))
    assert find_glue_dir() == (tmp_path / "glue").resolve()
    assert find_glue_dir(tmp_path / "glue" / ".." / "glue") == (tmp_path / "glue").resolve()
    monkeypatch.setenv("HLORA_GLUE_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match="HLORA_GLUE_DIR"):
        find_glue_dir()
