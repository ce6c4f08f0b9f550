"""A synthetic, long-tailed dataset of Russian payment comments labelled with accounting codes.

The comments are meant to be as hard as real bank-statement purposes, so that a
hyperparameter search has something to find:

- sub-accounts of one account share their words (`60.01` payment for delivered goods and
  `60.02` an advance to a supplier; `68.01` / `68.02` / `68.04` taxes paid through the
  single tax payment, ЕНП; `66.01` loan principal and `66.02` its interest), and words
  cross accounts too ("аванс" is an advance to a supplier, from a buyer, on wages and on
  profit tax; "НДС" closes most invoices but only `68.02` pays it);
- some comments cannot be told apart at all: "Оплата по счёту № 12 от 03.02.2026" is
  written for goods received and for a prepayment, paid out and received, and "ЕНП за
  март" pays any of the taxes (see `SHARED`, about 12% of the rows): those rows carry the
  code they were booked to, as in a real ledger, and no model can get them all right;
- the cue often comes late (after numbers, dates, amounts), numbers, dates, months,
  quarters and amounts are written several ways, and comments are abbreviated
  ("з/п", "сч.", "дог."), cased and mistyped (swapped, dropped and doubled letters,
  Latin look-alikes of Cyrillic letters) as people type them.

There is no label noise beyond the shared comments: every other row's comment was written
for its code. The same seed gives the same rows.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CODES", "SHARED", "Code", "generate", "write"]


@dataclass(frozen=True)
class Code:
    """An accounting code: its rows, its own comments, and which shared ones it gets."""

    code: str
    rows: int
    templates: tuple[str, ...]
    # Share of the rows written from a shared pool (`SHARED`): comments other codes get too.
    shared: tuple[tuple[str, float], ...] = ()


# Comments several codes are booked from. Placeholders, filled by `_FILLERS`: {n} a
# document number, {d} a date, {m} a month, {mg} a month in the genitive, {q} a quarter,
# {s} an amount, {c} a company, {p} a person, {b} a bank, {vat} an invoice's VAT clause.
SHARED: dict[str, tuple[str, ...]] = {
    # An invoice paid, out or in, for goods received or in advance.
    "invoice": (
        "Оплата по счёту № {n} от {d}{vat}",
        "Оплата по сч. {n} от {d}{vat}",
        "Оплата по договору № {n} от {d}{vat}",
        "Оплата по счёту № {n} от {d} за товар{vat}",
    ),
    # The single tax payment: which tax it was is in a notice, not in the comment.
    "enp": (
        "Единый налоговый платёж",
        "ЕНП за {m}",
        "Пополнение ЕНС, {m}",
        "Единый налоговый платёж, срок уплаты {d}",
    ),
    # A transfer to an employee's card.
    "card": (
        "Перечисление на карту {p}",
        "Перевод на карту сотрудника {p}, {s}",
    ),
    # A loan paid back with its interest in one payment.
    "loan": (
        "Погашение кредита и процентов по договору № {n}",
        "Платёж по кредитному договору {n} за {m}",
    ),
}

_VAT_INVOICE = 0.8  # the share of invoice comments that end with a VAT clause

# Rows per code: a head near a quarter of the rows, then a long tail of 8-20. Codes of one
# account (the part before the dot) share their words; see the module docstring.
CODES: tuple[Code, ...] = (
    Code(
        "60.01",
        160,
        (
            "Оплата за товар по УПД № {n} от {d}, {c}{vat}",
            "Оплата поставщику {c} по договору поставки № {n} от {d}{vat}",
            "Оплата за материалы по счёту {n} от {d}{vat}",
            "Погашение задолженности перед {c} по договору {n}{vat}",
            "Оплата по ТН № {n} от {d} за поставленный товар{vat}",
            "{c}: оплата за поставленные комплектующие, сч. {n}{vat}",
            "Доплата по счёту № {n} от {d} за товар{vat}",
            "Оплата по счёту № {n} от {d} за запчасти, {c}{vat}",
            "Оплата по сч.-ф. № {n} от {d}{vat}",
            "Оплата за оборудование по УПД {n}, {c}{vat}",
        ),
        (("invoice", 0.15),),
    ),
    Code(
        "62.01",
        110,
        (
            "Оплата от покупателя {c} по счёту № {n} от {d}{vat}",
            "Поступление оплаты за отгруженный товар по УПД № {n} от {d}{vat}",
            "{c} оплата по договору № {n} за поставленную продукцию{vat}",
            "Погашение задолженности покупателем {c} по договору {n}{vat}",
            "Оплата по накладной № {n} от {d}, плательщик {c}{vat}",
            "Поступление от {c} по счёту {n}{vat}",
            "Оплата за продукцию по УПД № {n} от {d}{vat}",
            "Оплата от {c} по счёту № {n} от {d} за товар{vat}",
        ),
        (("invoice", 0.15),),
    ),
    Code(
        "70",
        80,
        (
            "Заработная плата за {m} по реестру № {n}",
            "Выплата зарплаты за первую половину {mg}",
            "Аванс по заработной плате за {m}",
            "Перечисление заработной платы на карту {p} за {m}",
            "Зарплата {p} за {m}, НДФЛ удержан",
            "Окончательный расчёт при увольнении {p}",
            "Отпускные {p} за {m}",
            "Выплата з/п по зарплатному проекту, реестр {n} от {d}",
            "Перечисление аванса за {m} сотрудникам, реестр {n}",
        ),
        (("card", 0.1),),
    ),
    Code(
        "60.02",
        55,
        (
            "Предоплата по счёту № {n} от {d} за товар{vat}",
            "Аванс поставщику {c} по договору поставки № {n}{vat}",
            "Предварительная оплата за оборудование по счёту {n}{vat}",
            "Оплата по счёту № {n} от {d} (предоплата 50%){vat}",
            "Авансовый платёж по договору № {n} от {d} за материалы{vat}",
            "100% предоплата по сч. {n} от {d}{vat}",
            "Оплата по договору поставки № {n} от {d}, аванс{vat}",
            "Предоплата поставщику {c} по счёту № {n}{vat}",
        ),
        (("invoice", 0.1),),
    ),
    Code(
        "68.02",
        40,
        (
            "НДС за {q}",
            "Уплата НДС за {q}, срок уплаты {d}",
            "Единый налоговый платёж (НДС за {q})",
            "ЕНП: НДС 1/3 за {q}",
            "Перечисление НДС по декларации за {q}",
            "Налог на добавленную стоимость за {q}",
        ),
        (("enp", 0.15),),
    ),
    Code(
        "62.02",
        30,
        (
            "Предоплата от покупателя {c} по счёту {n}{vat}",
            "Аванс по договору № {n} от {d} за продукцию{vat}",
            "Оплата по счёту № {n} от {d} (аванс){vat}",
            "Предварительная оплата по договору поставки {n}, {c}{vat}",
            "Авансовый платёж за {m} по договору {n}{vat}",
            "Предоплата от {c} за товар по счёту № {n} от {d}{vat}",
        ),
        (("invoice", 0.1),),
    ),
    Code(
        "69.01",
        24,
        (
            "Страховые взносы за {m}",
            "ЕНП: страховые взносы за {m}",
            "Взносы на ОПС, ОМС и ВНиМ за {m}",
            "Уплата страховых взносов по единому тарифу за {m}",
            "Взносы в СФР за {m}",
        ),
        (("enp", 0.15),),
    ),
    Code(
        "68.01",
        20,
        (
            "НДФЛ за {m}",
            "НДФЛ с заработной платы за {m}",
            "Налог на доходы физических лиц за {m}",
            "ЕНП: НДФЛ с 1 по 22 число, {m}",
            "НДФЛ с дивидендов за {q}",
            "Перечисление удержанного НДФЛ, уведомление от {d}",
        ),
        (("enp", 0.1),),
    ),
    Code(
        "71.01",
        18,
        (
            "Выдача под отчёт {p} на хоз. нужды",
            "Перечисление подотчётных средств на карту {p}",
            "Под отчёт на командировку {p}, приказ № {n}",
            "Возмещение перерасхода по авансовому отчёту № {n}, {p}",
            "Перечисление на карту сотруднику {p} на хозяйственные расходы",
        ),
        (("card", 0.1),),
    ),
    Code(
        "76.05",
        16,
        (
            "Оплата аренды офиса за {m} по договору {n}{vat}",
            "Оплата услуг связи за {m}, счёт № {n}{vat}",
            "Оплата по счёту № {n} от {d} за юридические услуги{vat}",
            "Коммунальные услуги за {m}, {c}{vat}",
            "Оплата за электроэнергию по договору {n} за {m}{vat}",
        ),
    ),
    Code(
        "91.02",
        14,
        (
            "Комиссия банка за ведение счёта за {m}",
            "Комиссия за перевод по п/п № {n}",
            "Плата за обслуживание системы «Клиент-Банк» за {m}",
            "Пени по договору № {n} от {d}, {c}",
            "Штраф за просрочку поставки по договору {n}",
            "Комиссия за выдачу кредита по договору {n}",
        ),
    ),
    Code(
        "66.01",
        12,
        (
            "Погашение кредита по договору № {n} от {d}",
            "Возврат основного долга по кредитному договору {n}",
            "Погашение ссудной задолженности, КД № {n}",
            "Погашение основного долга по кредиту, {m}",
        ),
        (("loan", 0.2),),
    ),
    Code(
        "66.02",
        12,
        (
            "Проценты по кредиту за {m}, договор № {n}",
            "Уплата процентов по кредитному договору {n} за {m}",
            "Погашение процентов по КД № {n} от {d}",
            "Проценты за пользование кредитом за {m}",
        ),
        (("loan", 0.2),),
    ),
    Code(
        "68.04",
        10,
        (
            "Налог на прибыль за {q}",
            "Авансовый платёж по налогу на прибыль за {m}",
            "ЕНП: налог на прибыль за {q}",
            "Налог на прибыль в федеральный бюджет за {q}",
        ),
        (("enp", 0.1),),
    ),
    Code(
        "69.11",
        10,
        (
            "Взносы на травматизм за {m}",
            "Страховые взносы от НС и ПЗ за {m}",
            "Взносы на страхование от несчастных случаев за {m}",
            "Страховые взносы (травматизм) за {m}, СФР",
        ),
    ),
    Code(
        "73.01",
        9,
        (
            "Выдача займа сотруднику {p} по договору № {n}",
            "Беспроцентный заём {p}, договор {n} от {d}",
            "Перечисление на карту {p} по договору займа № {n}",
            "Заём работнику {p} по заявлению от {d}",
        ),
        (("card", 0.15),),
    ),
    Code(
        "51",
        8,
        (
            "Перевод собственных средств на расчётный счёт в {b}",
            "Перечисление между своими счетами",
            "Перевод средств на счёт организации в другом банке",
            "Пополнение расчётного счёта в {b} собственными средствами",
        ),
    ),
    Code(
        "75.02",
        8,
        (
            "Выплата дивидендов участнику {p} за {q}",
            "Дивиденды за 2025 год по решению участника от {d}",
            "Перечисление дивидендов {p}, протокол № {n}",
            "Выплата части прибыли участнику {p}",
        ),
    ),
)

COMPANIES = (
    "ООО «Ромашка»",
    "АО «Вектор»",
    "ИП Иванов А.С.",
    "ООО «СтройМаркет»",
    "ООО «Техносфера»",
    "ПАО «Северный банк»",
    "ООО «Логистик-Про»",
    "АО «Альфа-Трейд»",
    'ООО "Меридиан"',
    "ИП Соколова Е.В.",
)
PEOPLE = (
    "Петров П.П.",
    "Смирновой О.Н.",
    "Кузнецову Д.А.",
    "Иванов И.И.",
    "Васильевой А.М.",
    "Попов С.В.",
    "Морозову К.Е.",
)
BANKS = ("ПАО Сбербанк", "АО «Альфа-Банк»", "Банк ВТБ (ПАО)", "АО «Т-Банк»")
MONTHS = (
    "январь",
    "февраль",
    "март",
    "апрель",
    "май",
    "июнь",
    "июль",
    "август",
    "сентябрь",
    "октябрь",
    "ноябрь",
    "декабрь",
)
_GENITIVE = (
    "января",
    "февраля",
    "марта",
    "апреля",
    "мая",
    "июня",
    "июля",
    "августа",
    "сентября",
    "октября",
    "ноября",
    "декабря",
)
_ROMAN = ("I", "II", "III", "IV")

# How people shorten and misspell; each rule applies to a comment with its probability.
_ABBREVIATIONS = (
    (r"заработной платы", "з/п", 0.3),
    (r"заработная плата", "з/п", 0.3),
    (r"Заработная плата", "З/п", 0.3),
    (r"по договору", "по дог.", 0.25),
    (r"договор", "д-р", 0.1),
    (r"по счёту", "по сч.", 0.25),
    (r"Оплата", "Опл.", 0.1),
    (r"поставщику", "пост-ку", 0.1),
    (r"сотруднику", "сотр.", 0.2),
    (r"страховые взносы", "стр. взносы", 0.3),
    (r"Страховые взносы", "Стр.взносы", 0.3),
    (r"Перечисление", "Перечисл.", 0.15),
    (r"№ ", "N", 0.2),
    (r"№ ", "№", 0.2),
    (r"ё", "е", 0.6),
)
# Latin letters that look like Cyrillic ones (a 1C export, a copied template).
_LOOK_ALIKES = {"а": "a", "о": "o", "е": "e", "с": "c", "р": "p", "х": "x"}


def _sum(rng: random.Random) -> float:
    return rng.randint(500, 2_000_000) + rng.randint(0, 99) / 100


def _money(value: float, rng: random.Random) -> str:
    rubles, kopecks = f"{value:.2f}".split(".")
    spaced = f"{int(rubles):,}".replace(",", " ")
    return rng.choice(
        (
            f"{spaced}-{kopecks}",
            f"{rubles}.{kopecks}",
            f"{spaced},{kopecks} руб.",
            f"{rubles} р.",
            f"{spaced} руб. {kopecks} коп.",
        )
    )


def _amount(rng: random.Random) -> str:
    return _money(_sum(rng), rng)


def _date(rng: random.Random) -> str:
    day, month = rng.randint(1, 28), rng.randint(1, 12)
    return rng.choice(
        (
            f"{day:02d}.{month:02d}.2026",
            f"{day:02d}.{month:02d}.26",
            f"{day} {_GENITIVE[month - 1]} 2026 г.",
            f"{day:02d}.{month:02d}.2026г.",
        )
    )


def _month(rng: random.Random) -> str:
    month = rng.randint(1, 12)
    return rng.choice(
        (
            f"{MONTHS[month - 1]} 2026",
            f"{MONTHS[month - 1]} 2026 г.",
            f"{month:02d}.2026",
            MONTHS[month - 1],
            f"{MONTHS[month - 1][:3]}. 2026",
        )
    )


def _month_of(rng: random.Random) -> str:
    """A month in the genitive: "за первую половину марта 2026"."""
    month = rng.randint(1, 12)
    return rng.choice((f"{_GENITIVE[month - 1]} 2026", f"{_GENITIVE[month - 1]} 2026 г."))


def _quarter(rng: random.Random) -> str:
    q = rng.randint(1, 4)
    return rng.choice(
        (f"{q} кв. 2026", f"{_ROMAN[q - 1]} квартал 2026 г.", f"{q} квартал 2026", f"{q}кв2026")
    )


def _number(rng: random.Random) -> str:
    n = rng.randint(1, 9999)
    return rng.choice((str(n), str(n), f"А-{n}/26", f"{n}/26-П", f"0000-{n:06d}"))


def _vat(rng: random.Random) -> str:
    """How an invoice payment ends: the sum and the VAT in it (20%, or 22% from 2026), or none."""
    if rng.random() > _VAT_INVOICE:
        return ""
    total = _sum(rng)
    rate = rng.choice((20, 22, 22))
    vat = _money(total * rate / (100 + rate), rng)
    return rng.choice(
        (
            f". В т.ч. НДС {rate}% - {vat}",
            f", в том числе НДС ({rate}%) {vat}",
            f" Сумма {_money(total, rng)} В т.ч. НДС({rate}%) {vat}",
            ". НДС не облагается",
            ", без НДС",
            f". Сумма {_money(total, rng)}, без налога (НДС)",
        )
    )


_FILLERS: dict[str, Callable[[random.Random], str]] = {
    "n": _number,
    "d": _date,
    "m": _month,
    "mg": _month_of,
    "q": _quarter,
    "s": _amount,
    "c": lambda rng: rng.choice(COMPANIES),
    "p": lambda rng: rng.choice(PEOPLE),
    "b": lambda rng: rng.choice(BANKS),
    "vat": _vat,
}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(template: str, rng: random.Random) -> str:
    text = _PLACEHOLDER.sub(lambda m: _FILLERS[m.group(1)](rng), template)
    return text.replace("г..", "г.")  # a date's "г." before a clause's full stop


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:  # two letters swapped
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:  # a letter dropped
        return word[:i] + word[i + 1 :]
    if kind == 2:  # a letter doubled
        return word[:i] + word[i] + word[i:]
    # a Latin look-alike for a Cyrillic letter
    return "".join(_LOOK_ALIKES.get(ch, ch) if j == i else ch for j, ch in enumerate(word))


def _as_typed(text: str, rng: random.Random) -> str:
    """`text` as a person types it: abbreviated, mistyped, cased."""
    for pattern, replacement, probability in _ABBREVIATIONS:
        if rng.random() < probability:
            text = re.sub(pattern, replacement, text, count=1)
    if rng.random() < 0.3:
        words = text.split(" ")
        for _ in range(rng.choice((1, 1, 2))):
            candidates = [k for k, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
            if candidates:
                k = rng.choice(candidates)
                words[k] = _typo(words[k], rng)
        text = " ".join(words)
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.2:
        text = text.upper()
    return text


def generate(seed: int = 7, scale: float = 1.0) -> list[tuple[str, str]]:
    """(comment, code) rows, shuffled; `scale` multiplies the head counts (tail stays >= 8)."""
    rng = random.Random(seed)
    rows = []
    for code in CODES:
        n = max(8, round(code.rows * scale)) if code.rows > 20 else code.rows
        for _ in range(n):
            template = rng.choice(code.templates)
            roll = rng.random()
            for pool, share in code.shared:
                if roll < share:
                    template = rng.choice(SHARED[pool])
                    break
                roll -= share
            rows.append((_as_typed(_fill(template, rng), rng), code.code))
    rng.shuffle(rows)
    return rows


def write(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    """Writes `rows` as CSV (`text,label`) or JSONL by the file's extension, UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text(
            "".join(
                json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows
            ),
            encoding="utf-8",
        )
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
