"""The demo's payment comments: long-tailed, grouped by account, and hard to tell apart."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

from services.cli.demo_data import generate

ACCOUNTING_CODE = re.compile(r"\d{2}(\.\d{2})?")


def test_the_classes_are_long_tailed_and_grouped_by_account() -> None:
    rows = generate()
    counts = Counter(code for _, code in rows)
    assert len(rows) == 636 and len(counts) == 18
    assert all(ACCOUNTING_CODE.fullmatch(code) for code in counts)
    assert 0.24 <= max(counts.values()) / len(rows) <= 0.27
    rare = [n for n in counts.values() if n <= 20]
    assert len(rare) >= 10 and min(rare) == 8
    # Sub-accounts of one account (the part before the dot): 60, 62, 66, 68 (three), 69.
    accounts = Counter(code.split(".")[0] for code in counts)
    assert sorted(a for a, n in accounts.items() if n >= 2) == ["60", "62", "66", "68", "69"]
    assert accounts["68"] == 3


def test_a_seed_gives_the_same_rows_and_scale_only_the_head() -> None:
    assert generate(seed=7) == generate(seed=7)
    assert generate(seed=7) != generate(seed=8)
    half = Counter(code for _, code in generate(scale=0.5))
    full = Counter(code for _, code in generate())
    assert half["60.01"] == 80 and half["51"] == full["51"] == 8


def test_comments_are_written_as_people_write_them() -> None:
    texts = [text for text, _ in generate()]
    dated = [t for t in texts if re.search(r"\d{2}\.\d{2}\.(20)?26|\d{1,2} [а-я]+я 2026", t)]
    assert len(dated) > len(texts) // 4
    assert sum(bool(re.search(r"\d[\d ]*[-.,]\d{2}\b|\d р\.", t)) for t in texts) > 100  # sums
    assert sum("з/п" in t.lower() or "по сч." in t.lower() for t in texts) >= 20
    # A word mixing Cyrillic letters with Latin look-alikes (a typo no spell checker sees).
    mixed = re.compile(r"\b(?=\w*[а-яё])(?=\w*[aoecpx])\w+\b", re.IGNORECASE)
    assert sum(bool(mixed.search(t)) for t in texts) >= 5
    assert sum(t.isupper() for t in texts) >= 10 and sum(t.islower() for t in texts) >= 40


def test_the_same_words_are_booked_to_different_codes() -> None:
    month = re.compile(r"(янв|фев|мар|апр|ма[йя]|июн|июл|авг|сен|окт|ноя|дек)")
    codes_of: dict[frozenset[str], set[str]] = defaultdict(set)
    for text, code in generate():
        words = re.findall(r"[а-яёa-z]{3,}", text.lower())
        codes_of[frozenset(w for w in words if not month.match(w))].add(code)
    shared = [codes for codes in codes_of.values() if len(codes) >= 2]
    assert len(shared) >= 5
    assert any({"60.01", "62.01"} <= codes for codes in shared)  # paid out or received
    assert any({"60.01", "60.02"} <= codes for codes in shared)  # goods received or prepaid


def test_a_bag_of_words_classifier_is_clearly_short_of_perfect() -> None:
    rows = generate()
    texts, codes = [t for t, _ in rows], [c for _, c in rows]
    train_x, test_x, train_y, test_y = train_test_split(
        texts, codes, test_size=0.25, stratify=codes, random_state=0
    )
    words = CountVectorizer()
    model = LogisticRegression(class_weight="balanced").fit(words.fit_transform(train_x), train_y)
    score = f1_score(test_y, model.predict(words.transform(test_x)), average="macro")
    # The comments before this generator scored 1.0 here; these 0.85: hard, not noise.
    assert 0.6 < score < 0.9
