"""Loading JSONL / CSV (UTF-8, errors naming their field), the stratified split, class filtering."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.trainer.core.data import (
    WEIGHT_FORMULA,
    class_statistics_table,
    class_weights_json,
    load_examples,
    prepare,
    write_split,
)
from services.trainer.core.types import DatasetSpec, Example, Task

CLS = Task.CLASSIFICATION
GEN = Task.GENERATION


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )
    return path


def _labelled(path: Path, counts: dict[str, int]) -> Path:
    rows: list[dict[str, object]] = []
    for label, n in counts.items():
        rows.extend({"text": f"оплата {label} №{i}", "label": label} for i in range(n))
    return _jsonl(path, rows)


def _spec(path: Path, task: Task = CLS, **kwargs: object) -> DatasetSpec:
    return DatasetSpec(uri=str(path), task=task, **kwargs)  # type: ignore[arg-type]


def _load(path: Path, task: Task = CLS, fmt: str = "", **kwargs: object) -> list[Example]:
    return load_examples(str(path), fmt, task, _spec(path, task, **kwargs))


def _error(excinfo: pytest.ExceptionInfo[InvalidArgument]) -> tuple[str | None, str]:
    return excinfo.value.field, str(excinfo.value)


# ---- loading ---------------------------------------------------------------------------


def test_jsonl_keeps_cyrillic_and_turns_number_labels_into_strings(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "payments.jsonl",
        [
            {"text": "Оплата по счёту № 17 от 03.02.2024, НДС не облагается", "label": 62},
            {"text": "Возврат займа «Ромашка»", "label": " 66.03 "},
            {"text": "interest", "label": 91.5},
        ],
    )
    examples = _load(path)
    assert examples == [
        Example(text="Оплата по счёту № 17 от 03.02.2024, НДС не облагается", label="62"),
        Example(text="Возврат займа «Ромашка»", label="66.03"),
        Example(text="interest", label="91.5"),
    ]


def test_csv_with_bom_semicolons_quotes_and_cyrillic(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    content = 'comment;code\r\n"Оплата; аванс\r\nпо договору";60\r\nЗарплата за май;70\r\n'
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    examples = _load(path, text_field="comment", label_field="code")
    assert examples == [
        Example(text="Оплата; аванс\r\nпо договору", label="60"),
        Example(text="Зарплата за май", label="70"),
    ]


def test_json_array_and_generation_fields(tmp_path: Path) -> None:
    path = tmp_path / "qa.json"
    path.write_text(
        json.dumps([{"q": "Что такое НДС?", "a": "Налог на добавленную стоимость."}]),
        encoding="utf-8",
    )
    examples = _load(path, GEN, prompt_field="q", target_field="a")
    assert examples == [Example(prompt="Что такое НДС?", target="Налог на добавленную стоимость.")]


def test_format_comes_from_the_extension_or_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("text,label\nhello,a\n", encoding="utf-8")
    with pytest.raises(InvalidArgument) as caught:
        _load(path)
    field, message = _error(caught)
    assert field == "dataset.format"
    assert ".txt" in message
    assert _load(path, fmt="CSV") == [Example(text="hello", label="a")]
    with pytest.raises(InvalidArgument) as caught:
        _load(path, fmt="parquet")
    assert _error(caught)[0] == "dataset.format"
    assert "parquet" in str(caught.value)


def test_missing_file_names_the_uri_field(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InvalidArgument) as caught:
        _load(missing)
    assert _error(caught) == ("dataset.uri", f"dataset.uri: {missing} does not exist")
    spec = _spec(missing)
    with pytest.raises(InvalidArgument) as caught:
        load_examples(str(missing), "", CLS, spec, field_prefix="dataset.validation_uri")
    assert caught.value.field == "dataset.validation_uri"
    with pytest.raises(InvalidArgument) as caught:
        load_examples("s3://bucket/data.jsonl", "", CLS, spec)
    assert caught.value.field == "dataset.uri"
    assert "local" in str(caught.value)


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(InvalidArgument) as caught:
        _load(path)
    field, message = _error(caught)
    assert field == "dataset.uri"
    assert "line 3 is not valid JSON" in message
    path.write_text('{"text": "a", "label": "x"}\n["b", "y"]\n', encoding="utf-8")
    with pytest.raises(InvalidArgument, match="line 2 is a JSON list, not an object"):
        _load(path)


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "cp1251.csv"
    path.write_bytes(b"text,label\n" + "Оплата,62\n".encode("cp1251"))
    with pytest.raises(InvalidArgument) as caught:
        _load(path)
    field, message = _error(caught)
    assert field == "dataset.uri"
    assert "line 2 is not valid UTF-8" in message


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "text,label\n")],
)
def test_a_file_without_rows_is_rejected(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidArgument) as caught:
        _load(path)
    assert caught.value.field == "dataset.uri"
    assert "holds no rows" in str(caught.value)


def test_missing_fields_name_the_spec_field_and_the_fields_present(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"comment": "x", "code": "1"}])
    with pytest.raises(InvalidArgument) as caught:
        _load(path)
    field, message = _error(caught)
    assert field == "dataset.text_field"
    assert "no field 'text'" in message
    assert "'comment', 'code'" in message
    with pytest.raises(InvalidArgument) as caught:
        _load(path, text_field="comment")
    assert caught.value.field == "dataset.label_field"
    assert "'label'" in str(caught.value)

    with pytest.raises(InvalidArgument) as caught:
        _load(path, GEN)
    assert caught.value.field == "dataset.prompt_field"
    with pytest.raises(InvalidArgument) as caught:
        _load(path, GEN, prompt_field="comment")
    assert caught.value.field == "dataset.target_field"
    assert "'response'" in str(caught.value)

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("comment,code\nx,1\n", encoding="utf-8")
    with pytest.raises(InvalidArgument) as caught:
        _load(csv_path, label_field="code")
    assert caught.value.field == "dataset.text_field"
    assert "'comment', 'code'" in str(caught.value)


def test_a_nested_value_is_rejected_with_its_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": ["a", "b"]}])
    with pytest.raises(InvalidArgument) as caught:
        _load(path)
    assert caught.value.field == "dataset.label_field"
    assert "line 1" in str(caught.value)


def test_rows_with_empty_text_or_label_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "ok", "label": "a"},
            {"text": "   ", "label": "a"},
            {"text": "no label", "label": ""},
            {"text": None, "label": "b"},
            {"text": "fine", "label": "b"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="services.trainer.core.data"):
        examples = _load(path)
    assert [e.text for e in examples] == ["ok", "fine"]
    assert "dropped 3 of 5 rows" in caplog.text

    empty = _jsonl(tmp_path / "e.jsonl", [{"text": "", "label": "a"}, {"text": "x", "label": " "}])
    with pytest.raises(InvalidArgument) as caught:
        _load(empty)
    assert caught.value.field == "dataset.uri"
    assert "all 2 rows" in str(caught.value)


# ---- prepare: the split ----------------------------------------------------------------


def test_stratified_split_gives_each_class_its_share(tmp_path: Path) -> None:
    counts = {"A": 50, "B": 20, "C": 8, "D": 2, "E": 1}
    data = prepare(_spec(_labelled(tmp_path / "d.jsonl", counts), validation_fraction=0.2), 0)
    train = Counter(e.label for e in data.train)
    validation = Counter(e.label for e in data.validation)
    assert sum(validation.values()) == round(81 * 0.2)
    assert validation["A"] == 10
    assert validation["B"] == 4
    assert validation["E"] == 0  # a single row stays in training
    assert all(train[label] >= 1 for label in counts)
    assert train + validation == Counter(counts)
    assert {e.text for e in data.train}.isdisjoint(e.text for e in data.validation)
    assert data.labels == ("A", "B", "C", "D", "E")


def test_split_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    path = _labelled(tmp_path / "d.jsonl", {"A": 40, "B": 30})
    first = prepare(_spec(path, seed=1), 0)
    assert prepare(_spec(path, seed=1), 0).validation == first.validation
    assert prepare(_spec(path, seed=2), 0).validation != first.validation


def test_min_samples_excludes_classes_by_training_count(tmp_path: Path) -> None:
    path = _labelled(tmp_path / "d.jsonl", {"60": 60, "62": 20, "91": 10, "99": 3})
    data = prepare(_spec(path, validation_fraction=0.1), min_samples_per_class=10)
    assert data.stats is not None
    # "91" has 10 rows, 9 of them in training: under the minimum.
    assert dict(data.stats.excluded) == {"91": 9, "99": 3}
    assert data.labels == ("60", "62")
    assert {e.label for e in data.train} == {"60", "62"}
    # Their validation rows stay, to be scored as misses: macro-F1 must not ignore them.
    assert {e.label for e in data.validation} == {"60", "62", "91"}
    assert dict(data.stats.untrained_validation) == {"91": 1}
    assert dict(data.stats.counts) == {"60": 54, "62": 18}
    assert dict(data.stats.weights) == pytest.approx({"60": 72 / (2 * 54), "62": 72 / (2 * 18)})
    assert data.stats.imbalance_ratio == pytest.approx(3.0)


def test_too_few_classes_left_names_min_samples(tmp_path: Path) -> None:
    path = _labelled(tmp_path / "d.jsonl", {"a": 50, "b": 5, "c": 4})
    with pytest.raises(InvalidArgument) as caught:
        prepare(_spec(path), min_samples_per_class=10)
    field, message = _error(caught)
    assert field == "balancing.min_samples_per_class"
    assert "1 of 3 classes" in message
    with pytest.raises(InvalidArgument) as caught:
        prepare(_spec(path), min_samples_per_class=-1)
    assert caught.value.field == "balancing.min_samples_per_class"


def test_a_single_label_is_rejected(tmp_path: Path) -> None:
    path = _labelled(tmp_path / "d.jsonl", {"only": 20})
    with pytest.raises(InvalidArgument) as caught:
        prepare(_spec(path), 0)
    assert caught.value.field == "dataset.label_field"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_validation_fraction_outside_zero_one_is_rejected(tmp_path: Path, fraction: float) -> None:
    path = _labelled(tmp_path / "d.jsonl", {"a": 10, "b": 10})
    with pytest.raises(InvalidArgument) as caught:
        prepare(_spec(path, validation_fraction=fraction), 0)
    assert caught.value.field == "dataset.validation_fraction"


def test_validation_file_keeps_labels_not_trained_on_as_misses(tmp_path: Path) -> None:
    train = _labelled(tmp_path / "train.jsonl", {"a": 20, "b": 20, "rare": 2})
    validation = _jsonl(
        tmp_path / "val.jsonl",
        [
            {"text": "x", "label": "a"},
            {"text": "y", "label": "b"},
            {"text": "z", "label": "rare"},
            {"text": "w", "label": "unseen"},
        ],
    )
    # The fraction is not used with a validation file, so an invalid one does not matter.
    spec = _spec(train, validation_uri=str(validation), validation_fraction=0.0)
    data = prepare(spec, min_samples_per_class=5)
    assert len(data.train) == 40
    assert [e.label for e in data.validation] == ["a", "b", "rare", "unseen"]
    assert data.stats is not None
    assert dict(data.stats.excluded) == {"rare": 2}
    assert dict(data.stats.untrained_validation) == {"rare": 1, "unseen": 1}

    missing = _spec(train, validation_uri=str(tmp_path / "missing.jsonl"))
    with pytest.raises(InvalidArgument) as caught:
        prepare(missing, 0)
    assert caught.value.field == "dataset.validation_uri"

    unrelated = _jsonl(tmp_path / "unrelated.jsonl", [{"text": "q", "label": "zzz"}])
    with pytest.raises(InvalidArgument) as caught:
        prepare(_spec(train, validation_uri=str(unrelated)), 0)
    assert caught.value.field == "dataset.validation_uri"


def test_generation_split_is_random_and_complete(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"prompt": f"вопрос {i}", "response": f"ответ {i}"} for i in range(30)
    ]
    path = _jsonl(tmp_path / "gen.jsonl", rows)
    data = prepare(_spec(path, GEN, validation_fraction=0.2), 0)
    assert len(data.validation) == 6
    assert len(data.train) == 24
    assert data.labels == ()
    assert data.stats is None
    assert {e.prompt for e in data.train} | {e.prompt for e in data.validation} == {
        f"вопрос {i}" for i in range(30)
    }
    # A random split, not the last rows of the file.
    assert [e.prompt for e in data.validation] != [f"вопрос {i}" for i in range(24, 30)]


def test_fingerprint_follows_the_data_and_the_split_settings(tmp_path: Path) -> None:
    path = _labelled(tmp_path / "d.jsonl", {"a": 20, "b": 20})
    base = prepare(_spec(path), 0).fingerprint
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes(path.read_bytes())
    assert prepare(_spec(copy), 0).fingerprint == base
    variants = {
        prepare(_spec(path, seed=43), 0).fingerprint,
        prepare(_spec(path, validation_fraction=0.2), 0).fingerprint,
        prepare(_spec(path), 3).fingerprint,
        prepare(_spec(path, validation_uri=str(copy)), 0).fingerprint,
    }
    assert base not in variants
    assert len(variants) == 4
    changed = _labelled(tmp_path / "d.jsonl", {"a": 20, "b": 21})
    assert prepare(_spec(changed), 0).fingerprint != base


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=40), min_size=2, max_size=8),
    fraction=st.floats(min_value=0.01, max_value=0.9),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_stratified_split_invariants(counts: list[int], fraction: float, seed: int) -> None:
    if all(n == 1 for n in counts):
        return  # nothing can go to validation; covered by the error below
    by_label = {f"c{i}": n for i, n in enumerate(counts)}
    with tempfile.TemporaryDirectory() as folder:
        path = _labelled(Path(folder) / "d.jsonl", by_label)
        data = prepare(_spec(path, validation_fraction=fraction, seed=seed), 0)
    train = Counter(e.label for e in data.train)
    validation = Counter(e.label for e in data.validation)
    assert train + validation == Counter(by_label)
    capacity = sum(n - 1 for n in counts)
    assert sum(validation.values()) == min(max(1, round(sum(counts) * fraction)), capacity)
    # Largest remainder: each class gets at least its share rounded down and, unless a
    # class is too small to give its share rounded up, at most that.
    capped = any(math.ceil(n * fraction) > n - 1 for n in counts)
    for label, n in by_label.items():
        assert train[label] >= 1
        assert validation[label] >= min(n - 1, math.floor(n * fraction))
        if not capped:
            assert validation[label] <= math.ceil(n * fraction)


def test_all_singleton_classes_cannot_be_split(tmp_path: Path) -> None:
    path = _labelled(tmp_path / "d.jsonl", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(InvalidArgument) as caught:
        prepare(_spec(path), 0)
    assert caught.value.field == "dataset.validation_fraction"


# ---- outputs ---------------------------------------------------------------------------


def test_write_split_writes_utf8_rows_and_class_weights(tmp_path: Path) -> None:
    source = _labelled(tmp_path / "d.jsonl", {"60": 30, "62": 10, "99": 2})
    data = prepare(_spec(source), min_samples_per_class=3)
    paths = write_split(data, tmp_path / "out")
    assert set(paths) == {"train", "validation", "class_weights"}
    raw = paths["train"].read_text(encoding="utf-8")
    assert "оплата 60" in raw  # not \\u-escaped
    reloaded = load_examples(str(paths["train"]), "", CLS, _spec(paths["train"]))
    assert reloaded == list(data.train)
    weights = json.loads(paths["class_weights"].read_text(encoding="utf-8"))
    assert data.stats is not None
    assert weights == class_weights_json(data.stats)
    assert weights["formula"] == WEIGHT_FORMULA == "n_samples / (n_classes * n_samples_i)"
    assert weights["excluded"] == {"99": 2}
    assert set(weights["labels"]) == {"60", "62"}
    assert weights["labels"]["62"]["count"] == 9
    assert weights["labels"]["62"]["weight"] == pytest.approx(36 / (2 * 9))
    assert weights["imbalance_ratio"] == pytest.approx(27 / 9)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_write_split_of_generation_data_has_no_class_weights(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"prompt": f"p{i}", "response": f"ответ {i}"} for i in range(10)
    ]
    data = prepare(_spec(_jsonl(tmp_path / "g.jsonl", rows), GEN), 0)
    paths = write_split(data, tmp_path / "out")
    assert set(paths) == {"train", "validation"}
    reloaded = load_examples(str(paths["validation"]), "", GEN, _spec(paths["validation"], GEN))
    assert reloaded == list(data.validation)


def test_class_statistics_table_is_sorted_by_training_count(tmp_path: Path) -> None:
    path = _labelled(tmp_path / "d.jsonl", {"b": 20, "a": 40, "c": 20, "x": 2})
    data = prepare(_spec(path, validation_fraction=0.1), min_samples_per_class=3)
    table = class_statistics_table(data)
    assert [row[0] for row in table] == ["a", "b", "c"]
    assert [row[1:3] for row in table] == [(36, 4), (18, 2), (18, 2)]
    assert table[0][3] == pytest.approx(72 / (3 * 36))
    generation = prepare(
        _spec(_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "response": "r"}] * 4), GEN), 0
    )
    assert class_statistics_table(generation) == []
