"""Property tests of what a user types or points hlora at: config files, `--set` overrides and GLUE TSV
files. Whatever the input, the outcome is either a valid result or an HloraError of one line, never
another exception; TSV rows are either read or counted as skipped."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from hlora.config import Settings, apply_override, load_settings, settings_to_toml, validate_settings
from hlora.data.glue import TASKS, TaskSpec, read_glue_tsv
from hlora.errors import ConfigError, DataError, HloraError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = {name: field.annotation for name, field in Settings.model_fields.items()}
KNOWN_KEYS = [
    (section, key)
    for section, model in SECTIONS.items()
    if isinstance(model, type)
    for key in model.model_fields
]

# Values as a TOML document or a --set would give them: scalars of every TOML type (and the edge floats),
# strings that name real choices or nothing, lists, and tables.
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["mrpc", "RTE", "hlora", "flora", "tiers", "fixed", "cpu", "auto", "adamw", "bf16"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def one_line_error(e: HloraError) -> None:
    assert str(e).strip() and "\n" not in str(e) and "\r" not in str(e), repr(str(e))


def check_settings(build) -> Settings | None:
    """Run `build()`: a Settings, or an HloraError of one line. Anything else fails the test."""
    try:
        result = build()
    except HloraError as e:
        one_line_error(e)
        return None
    assert isinstance(result, Settings)
    return result


@FAST
@given(st.dictionaries(st.sampled_from([*SECTIONS, "extra"]), st.dictionaries(st.text(max_size=10), values)))
def test_any_table_of_tables_validates_or_is_a_config_error(raw):
    check_settings(lambda: validate_settings(raw))


@FAST
@given(st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), values), min_size=1, max_size=5))
def test_known_keys_with_any_values_validate_or_are_config_errors(items):
    raw: dict = {}
    for (section, key), value in items:
        raw.setdefault(section, {})[key] = value
    settings = check_settings(lambda: validate_settings(raw))
    if settings is not None:
        for (section, key), _ in items:
            assert getattr(getattr(settings, section), key) is not None or raw[section][key] is None


@FAST
@given(st.lists(st.text(max_size=40), max_size=4))
def test_any_set_strings_parse_or_are_config_errors(overrides):
    check_settings(lambda: load_settings(None, overrides))


@FAST
@given(st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), st.text(max_size=20)), min_size=1, max_size=4))
def test_set_of_a_known_key_to_any_text_parses_or_is_a_config_error(pairs):
    check_settings(lambda: load_settings(None, [f"{s}.{k}={text}" for (s, k), text in pairs]))


toml_lines = st.one_of(
    st.sampled_from([f"[{s}]" for s in SECTIONS] + ["[bogus]", "[run", "[[lora]]", "[lora.x]"]),
    st.builds(
        lambda key, text: f"{key} = {text}",
        st.sampled_from(sorted({k for _, k in KNOWN_KEYS}) + ["bogus", '"q\\nk"', "a.b"]),
        st.sampled_from(
            [
                "1",
                "0",
                "-3",
                "2.5",
                "inf",
                "nan",
                "true",
                '"mrpc"',
                "'x'",
                "[2, 4]",
                "[]",
                "{}",
                "[[1]]",
                "1979-05-27",
                '"""a\nb"""',
                "0x10",
            ]
        )
        | st.text(max_size=10),
    ),
    st.text(max_size=30),
)


@FAST
@given(st.lists(toml_lines, max_size=12), st.lists(st.text(max_size=30), max_size=2))
def test_any_toml_like_file_loads_or_is_a_config_error(lines, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.toml"
        path.write_text("\n".join(lines), encoding="utf-8")
        settings = check_settings(lambda: load_settings(path, overrides))
        if settings is not None:
            # the run directory's config.toml reads back as the same settings
            path.write_text(settings_to_toml(settings), encoding="utf-8")
            assert load_settings(path) == settings


@FAST
@given(st.text(max_size=40), st.sampled_from(["run.name", "data.data_dir", "model.name_or_path"]))
def test_any_string_value_survives_the_saved_config(text, key):
    """Bare --set strings may hold quotes, backslashes and control characters; config.toml keeps them."""
    settings = check_settings(lambda: validate_settings(_with(key, text)))
    assume(settings is not None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(settings_to_toml(settings), encoding="utf-8")
        assert load_settings(path) == settings


def _with(key: str, value) -> dict:
    raw: dict = {}
    apply_override(raw, f"{key}=0")
    section, leaf = key.split(".")
    raw[section][leaf] = value
    return raw


def test_deeply_nested_values_are_config_errors(tmp_path):
    deep = "[" * 2000 + "]" * 2000
    with pytest.raises(ConfigError) as info:
        load_settings(None, [f"lora.tiers={deep}"])
    one_line_error(info.value)
    (tmp_path / "c.toml").write_text(f"[lora]\ntiers = {deep}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.toml")
    one_line_error(info.value)


@pytest.mark.parametrize(
    "text",
    ['[method_options]\n"a\\nb" = 1\n', '[federation]\nmethod = "zeropad"\n[method_options]\n"x\\ny" = 1\n'],
)
def test_keys_with_line_breaks_still_give_one_line(tmp_path, text):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.toml")
    one_line_error(info.value)


# --- TSV files in a task's GLUE layout ---------------------------------------------------------------

# Text that stays inside one field: anything but the tab and line breaks (quotes, BOMs, NULs included).
field_text = st.text(
    st.characters(blacklist_characters="\t\r\n", blacklist_categories=("Cs",)), max_size=15
) | st.sampled_from(['"', '""quoted""', "\ufeff", "a\x00b", "don't", "\\t"])
usable_text = field_text.filter(lambda t: t.strip() != "")
empty_text = st.sampled_from(["", " ", "  \u3000", "\x1f"])
ROW_KINDS = ("good", "short", "long", "bad_label", "empty_text", "blank")  # blank: an empty line, not a row


@st.composite
def glue_files(draw):
    """A TSV in the layout of a random task (its columns among extra ones, in any order) with rows of
    every kind, and what reading it must give: the good rows' texts and labels, and the skip count."""
    task: TaskSpec = draw(st.sampled_from(list(TASKS.values())))
    wanted = [*task.text_columns, task.label_column]
    extra = draw(st.lists(st.sampled_from(["id", "#1 ID", "index", "qid1", "note"]), max_size=3, unique=True))
    header = draw(st.permutations([*wanted, *(c for c in extra if c not in wanted)]))
    width = len(header)
    rows: list[list[str]] = []
    expected: list[tuple[list[str], int]] = []
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), max_size=12))
    for kind in kinds:
        if kind == "blank":
            rows.append([])
            continue
        row = [draw(field_text) for _ in header]
        for col in task.text_columns:
            row[header.index(col)] = draw(usable_text)
        label_value = draw(st.sampled_from(sorted(task.tsv_labels)))
        row[header.index(task.label_column)] = draw(st.sampled_from(["", " "])) + label_value
        if kind == "short":
            row = row[: draw(st.integers(2, width - 1))]
        elif kind == "long":
            row += [draw(field_text) for _ in range(draw(st.integers(1, 3)))]
        elif kind == "bad_label":
            bad = draw(field_text.filter(lambda t: t.strip() not in task.tsv_labels))
            row[header.index(task.label_column)] = bad
        elif kind == "empty_text":
            row[header.index(draw(st.sampled_from(task.text_columns)))] = draw(empty_text)
        else:
            expected.append(([row[header.index(c)] for c in task.text_columns], task.tsv_labels[label_value]))
        rows.append(row)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join("\t".join(r) for r in [header, *rows]) + draw(st.sampled_from(["", newline]))
    bom = draw(st.booleans())
    return task, ("\ufeff" if bom else "") + text, expected, len(kinds) - len(expected) - kinds.count("blank")


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def read_with_warnings(path: Path, task: TaskSpec):
    handler = _Counter()
    logger = logging.getLogger("hlora.data")
    logger.addHandler(handler)
    try:
        return read_glue_tsv(path, task), handler.messages
    finally:
        logger.removeHandler(handler)


@FAST
@given(glue_files())
def test_tsv_rows_are_read_or_counted_as_skipped(case):
    task, text, expected, skipped = case
    note(repr(text))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.tsv"
        path.write_text(text, encoding="utf-8", newline="")
        if not expected:
            with pytest.raises(DataError, match="no usable row") as info:
                read_glue_tsv(path, task)
            one_line_error(info.value)
            return
        pairs, warnings = read_with_warnings(path, task)
    assert len(pairs) == len(expected)
    assert pairs.text_a == [texts[0] for texts, _ in expected]
    if len(task.text_columns) == 2:
        assert pairs.text_b == [texts[1] for texts, _ in expected]
    assert pairs.labels.tolist() == [label for _, label in expected]
    if skipped:
        assert (
            len(warnings) == 1
            and f"skipped {skipped} malformed row(s) of {len(expected) + skipped}" in warnings[0]
        )
    else:
        assert warnings == []


@FAST
@given(st.sampled_from(list(TASKS.values())), st.text(max_size=200) | st.binary(max_size=200).map(bytes))
def test_any_file_reads_as_rows_or_is_a_data_error(task, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dev.tsv"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
        try:
            pairs = read_glue_tsv(path, task)
        except DataError as e:
            one_line_error(e)
            return
    text = content.decode("utf-8-sig") if isinstance(content, bytes) else content
    assert 1 <= len(pairs) == len(pairs.labels) <= len(re.findall(r"\r\n|\r|\n", text))  # the header's too
    assert set(pairs.labels.tolist()) <= set(range(task.num_labels))


def test_a_field_over_the_csv_limit_is_a_data_error(tmp_path):
    task = TASKS["rte"]
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\t" + "x" * 200_000 + "\tb\tentailment\n")
    with pytest.raises(DataError, match="line 2 cannot be read as TSV"):
        read_glue_tsv(path, task)
