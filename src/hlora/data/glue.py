"""GLUE tasks: what each one looks like, and loading its labelled splits from local TSV files or the hub.

Local files follow the standard GLUE layout (`<dir>/<TASK>/{train,dev}.tsv`). They are read with
`encoding="utf-8-sig"` (MRPC's header starts with a BOM) and no quote processing (the texts hold bare `"`
characters). Rows that cannot be used (wrong number of fields, unknown label, empty text) are skipped and
reported in one warning line; every other problem a user can cause raises `DataError`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hlora.errors import DataError

log = logging.getLogger("hlora.data")

HUB_DATASET = "nyu-mll/glue"
GLUE_DIR_ENV = "HLORA_GLUE_DIR"
SPLITS = ("train", "dev")
_HUB_SPLITS = {"train": "train", "dev": "validation"}
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: its columns in the TSV files, its labels, and its fields in the hub dataset."""

    name: str  # lower case, as in the hub dataset's config names: "mrpc"
    dir_name: str  # the task's folder in a GLUE directory: "MRPC"
    text_columns: tuple[str, ...]  # header names of the one or two text columns
    label_column: str
    label_names: tuple[str, ...]  # index = label id
    tsv_labels: dict[str, int] = field(hash=False)  # label value as written in the TSV -> label id
    hub_text_fields: tuple[str, ...]  # field names in the hub dataset, in the order of text_columns
    positive_label: int | None  # the class whose F1 the task reports; None: accuracy only

    def __post_init__(self) -> None:
        if sorted(set(self.tsv_labels.values())) != list(range(self.num_labels)):
            raise ValueError(f"task {self.name}: tsv_labels must map onto every id 0..{self.num_labels - 1}")
        if not 1 <= len(self.text_columns) <= 2 or len(self.hub_text_fields) != len(self.text_columns):
            raise ValueError(f"task {self.name}: one or two text columns, and one hub field for each")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def has_f1(self) -> bool:
        return self.positive_label is not None


TASKS: dict[str, TaskSpec] = {
    "mrpc": TaskSpec(
        name="mrpc",
        dir_name="MRPC",
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        label_names=("not_equivalent", "equivalent"),
        tsv_labels={"0": 0, "1": 1},
        hub_text_fields=("sentence1", "sentence2"),
        positive_label=1,
    ),
    "rte": TaskSpec(
        name="rte",
        dir_name="RTE",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        label_names=("entailment", "not_entailment"),
        tsv_labels={"entailment": 0, "not_entailment": 1},
        hub_text_fields=("sentence1", "sentence2"),
        positive_label=None,
    ),
    "qqp": TaskSpec(
        name="qqp",
        dir_name="QQP",
        text_columns=("question1", "question2"),
        label_column="is_duplicate",
        label_names=("not_duplicate", "duplicate"),
        tsv_labels={"0": 0, "1": 1},
        hub_text_fields=("question1", "question2"),
        positive_label=1,
    ),
}


def get_task(name: str) -> TaskSpec:
    """The spec of task `name` (case-insensitive); DataError naming the known tasks if there is none."""
    spec = TASKS.get(str(name).strip().lower())
    if spec is None:
        raise DataError(f"unknown GLUE task {name!r}: known tasks are {', '.join(sorted(TASKS))}")
    return spec


@dataclass(frozen=True, eq=False)
class TextPairs:
    """Rows of one split: the first text, the second text (None for single-sentence tasks) and label ids."""

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray  # int64, one label id per row
    source: str  # the file path or hub id the rows came from

    def __post_init__(self) -> None:
        n = len(self.text_a)
        if len(self.labels) != n or (self.text_b is not None and len(self.text_b) != n):
            raise ValueError("text_a, text_b and labels must have the same length")

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextPairs:
        """The rows at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextPairs(
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=self.labels[idx].copy(),
            source=self.source,
        )

    def head(self, n: int | None) -> TextPairs:
        """The first `n` rows; `n` None or <= 0 means all of them."""
        if n is None or n <= 0 or n >= len(self):
            n = len(self)
        return TextPairs(
            text_a=self.text_a[:n],
            text_b=None if self.text_b is None else self.text_b[:n],
            labels=self.labels[:n].copy(),
            source=self.source,
        )


def read_glue_tsv(path: Path, task: TaskSpec) -> TextPairs:
    """Read one labelled GLUE TSV file, finding the text and label columns by their header names.

    Rows with the wrong number of fields, an unknown label value or an empty text are skipped and
    reported in one warning line. Raises DataError for a missing or unreadable file, a missing column,
    or a file with no usable row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"GLUE file not found: {path}")
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list[int] = []
    skipped = 0
    first_skip = ""
    total = 0
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty: expected a header row")
            header = [name.strip() for name in header]
            wanted = (*task.text_columns, task.label_column)
            missing = [name for name in wanted if name not in header]
            if missing == [task.label_column]:
                raise DataError(
                    f"{path} has no label column {task.label_column!r} for task {task.name}: only a labelled "
                    "file can be used, GLUE's test files have none "
                    f"(columns found: {', '.join(map(repr, header))})"
                )
            if missing:
                raise DataError(
                    f"{path} has no column {', '.join(map(repr, missing))} for task {task.name} "
                    f"(columns found: {', '.join(map(repr, header))})"
                )
            text_idx = [header.index(name) for name in task.text_columns]
            label_idx = header.index(task.label_column)
            for row in reader:
                if not row:  # a blank line (a trailing newline too many): nothing to skip or count
                    continue
                total += 1
                problem = _row_problem(row, len(header), text_idx, label_idx, task)
                if problem:
                    skipped += 1
                    if not first_skip:
                        first_skip = f"line {reader.line_num}: {problem}"
                    continue
                text_a.append(row[text_idx[0]])
                if len(text_idx) == 2:
                    text_b.append(row[text_idx[1]])
                labels.append(task.tsv_labels[row[label_idx].strip()])
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except csv.Error as e:  # a field over csv's size limit: not a TSV in the GLUE layout
        raise DataError(f"{path} line {reader.line_num} cannot be read as TSV: {e}") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if not labels:
        detail = f" ({skipped} skipped, first at {first_skip})" if skipped else ""
        raise DataError(f"{path} has no usable row{detail}")
    if skipped:
        log.warning("skipped %d malformed row(s) of %d in %s (first at %s)", skipped, total, path, first_skip)
    return TextPairs(
        text_a=text_a,
        text_b=text_b if len(text_idx) == 2 else None,
        labels=np.asarray(labels, dtype=np.int64),
        source=str(path),
    )


def _row_problem(row: list[str], width: int, text_idx: list[int], label_idx: int, task: TaskSpec) -> str:
    """Why a row cannot be used, or "" if it can."""
    if len(row) != width:
        return f"{len(row)} fields, expected {width}"
    label = row[label_idx].strip()
    if label not in task.tsv_labels:
        return f"unknown label {label!r} (expected one of {', '.join(map(repr, task.tsv_labels))})"
    for i, name in zip(text_idx, task.text_columns, strict=True):
        if not row[i].strip():
            return f"empty text in column {name!r}"
    return ""


def default_glue_candidates() -> list[Path]:
    """Folders searched for a GLUE copy when none is named: beside the cwd, in it, and beside the repo."""
    return [
        Path.cwd() / ".." / "shared" / "glue",
        Path.cwd() / "shared" / "glue",
        Path(__file__).resolve().parents[3] / ".." / "shared" / "glue",
    ]


def _has_task_folder(path: Path) -> bool:
    return path.is_dir() and any((path / spec.dir_name).is_dir() for spec in TASKS.values())


def _checked_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"GLUE folder {path} ({what}) does not exist or is not a folder")
    if not _has_task_folder(path):
        names = ", ".join(spec.dir_name for spec in TASKS.values())
        raise DataError(f"GLUE folder {path} ({what}) has no task sub-folder ({names})")
    return path.resolve()


def find_glue_dir(explicit: str | Path | None = None) -> Path | None:
    """The local GLUE folder to use, resolved, or None if there is none.

    In order: `explicit`; the env var HLORA_GLUE_DIR; then the first of `default_glue_candidates()` that
    holds a task sub-folder. A folder named explicitly or by the env var must exist and hold a task
    sub-folder, else DataError.
    """
    if explicit is not None and str(explicit) != "":
        return _checked_dir(explicit, "given as the data dir")
    from_env = os.environ.get(GLUE_DIR_ENV, "")
    if from_env:
        return _checked_dir(from_env, f"from {GLUE_DIR_ENV}")
    for candidate in default_glue_candidates():
        if _has_task_folder(candidate):
            return candidate.resolve()
    return None


def load_split(
    task: str | TaskSpec, split: str, data_dir: str | Path | None = None, *, allow_hub: bool = True
) -> TextPairs:
    """The labelled rows of `split` ("train" or "dev") of `task`.

    From a local GLUE folder if `find_glue_dir(data_dir)` finds one, else from the hub dataset
    nyu-mll/glue (when `allow_hub` and not offline). Raises DataError for the test split (GLUE hides its
    labels), an unknown split, a missing task folder or file, or when neither source is available.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    split = str(split).strip().lower()
    if split == "test":
        raise DataError(f"GLUE hides the labels of the test split of {spec.name}: use 'train' or 'dev'")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {spec.name}: use one of {', '.join(SPLITS)}")

    glue_dir = find_glue_dir(data_dir)
    if glue_dir is not None:
        task_dir = glue_dir / spec.dir_name
        if not task_dir.is_dir():
            raise DataError(f"GLUE folder {glue_dir} has no {spec.dir_name} sub-folder for task {spec.name}")
        return read_glue_tsv(task_dir / f"{split}.tsv", spec)

    # Reached only when no folder was named (a named one that is unusable raised above).
    looked = ", ".join(str(p.resolve()) for p in default_glue_candidates())
    offline = [name for name in _OFFLINE_ENVS if os.environ.get(name, "").strip().lower() in _TRUE]
    if not allow_hub:
        reason = "hub loading is turned off"
    elif offline:
        reason = f"{'/'.join(offline)} is set"
    else:
        try:
            return _load_from_hub(spec, split)
        except DataError:
            raise
        except Exception as e:  # network, cache or a missing package: the user's to fix
            first_line = (str(e).strip().splitlines() or [""])[0]
            reason = f"{type(e).__name__}: {first_line}"[:300]
    raise DataError(
        f"no local GLUE copy found (looked in: {looked}) and the hub is not available ({reason}): "
        f"pass --data-dir or set {GLUE_DIR_ENV}"
    )


def _load_from_hub(spec: TaskSpec, split: str) -> TextPairs:
    """The split from the hub dataset nyu-mll/glue; its label ids already follow `spec.label_names`."""
    import datasets  # lazily: slow to import and only needed without a local copy

    hub_split = _HUB_SPLITS[split]
    ds = datasets.load_dataset(HUB_DATASET, spec.name, split=hub_split)
    labels = np.asarray(ds["label"], dtype=np.int64)
    columns = [list(ds[name]) for name in spec.hub_text_fields]
    keep = (labels >= 0) & (labels < spec.num_labels)
    for col in columns:
        keep &= np.fromiter((bool(t and t.strip()) for t in col), dtype=bool, count=len(col))
    if not keep.all():
        log.warning("skipped %d unusable row(s) of %d in %s/%s:%s", int((~keep).sum()), len(keep),
                    HUB_DATASET, spec.name, hub_split)
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise DataError(f"{HUB_DATASET}/{spec.name} split {hub_split} has no usable row")
    return TextPairs(
        text_a=[columns[0][i] for i in idx],
        text_b=[columns[1][i] for i in idx] if len(columns) == 2 else None,
        labels=labels[idx],
        source=f"{HUB_DATASET}/{spec.name}:{hub_split}",
    )
