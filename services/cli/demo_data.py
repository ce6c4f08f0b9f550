"""A synthetic, long-tailed dataset of Russian payment comments labelled with accounting codes."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from pathlib import Path

# Accounting code -> templates of the payment comments booked to it. Placeholders:
# {n} document number, {d} date, {m} month, {q} quarter, {s} amount, {c} counterparty.
CODES: dict[str, Sequence[str]] = {
    "60.01": (
        "Оплата по счёту № {n} от {d} за поставку товара, {c}",
        "Оплата поставщику {c} по договору {n}, сумма {s} руб.",
        "Перечисление за материалы по счёту {n}, в т.ч. НДС 20%",
        "Оплата за товар по УПД № {n} от {d}",
        "Предоплата по счёту {n} за оборудование, {c}",
    ),
    "62.01": (
        "Поступление от покупателя {c} по счёту {n}",
        "Оплата от {c} за отгруженную продукцию по договору {n}",
        "Оплата по счёту на оплату № {n} от {d}, покупатель {c}",
        "Возврат долга покупателем {c} за {m}",
    ),
    "70": (
        "Выплата заработной платы за {m} по реестру № {n}",
        "Зарплата сотрудникам за первую половину {m}",
        "Перечисление заработной платы на карты работников, реестр {n}",
        "Аванс по заработной плате за {m}",
    ),
    "68.02": (
        "НДС за {q} квартал, налоговый период {q}/2026",
        "Уплата НДС по декларации за {q} квартал",
        "Единый налоговый платёж, НДС за {q} кв.",
    ),
    "69.01": (
        "Страховые взносы на ОПС за {m}",
        "Страховые взносы за {m}, ЕНП",
        "Взносы на обязательное социальное страхование за {m}",
    ),
    "20.01": (
        "Оплата аренды производственного помещения за {m}",
        "Аренда цеха по договору {n} за {m}",
        "Оплата электроэнергии для производства, счёт {n}",
    ),
    "26": (
        "Оплата аренды офиса за {m}, договор {n}",
        "Коммунальные услуги по офису за {m}",
        "Оплата услуг связи и интернета за {m}, счёт {n}",
    ),
    "44": (
        "Оплата рекламы в интернете по счёту {n}",
        "Доставка товара покупателям, транспортная компания {c}",
        "Оплата услуг маркетплейса за {m}",
    ),
    "71.01": (
        "Выдача под отчёт на командировочные расходы, {c}",
        "Перечисление подотчётных средств на хозяйственные нужды",
        "Возмещение перерасхода по авансовому отчёту № {n}",
    ),
    "91.02": (
        "Комиссия банка за ведение счёта за {m}",
        "Комиссия за перевод по платёжному поручению {n}",
        "Плата за обслуживание системы клиент-банк",
    ),
    "66.01": (
        "Погашение краткосрочного кредита по договору {n}",
        "Проценты по кредиту за {m}, договор {n}",
    ),
    "68.01": (
        "НДФЛ с заработной платы за {m}",
        "Перечисление НДФЛ за {m}, ЕНП",
    ),
    "76.05": (
        "Оплата юридических услуг по договору {n}, {c}",
        "Оплата консультационных услуг {c} за {m}",
    ),
    "51": (
        "Перевод собственных средств между счетами организации",
        "Перечисление на расчётный счёт в другом банке",
    ),
    "75.02": (
        "Выплата дивидендов участнику за {q} квартал",
        "Дивиденды по решению собрания участников от {d}",
    ),
    "73.01": (
        "Выдача беспроцентного займа сотруднику по договору {n}",
        "Погашение займа работником, договор {n}",
    ),
    "58.03": (
        "Предоставление займа {c} по договору {n}",
        "Возврат займа от {c} по договору {n}",
    ),
    "97": (
        "Оплата лицензии на программное обеспечение на год, {c}",
        "Подписка на бухгалтерскую программу на 12 месяцев",
    ),
}
# Rows per code: a head near a quarter of the rows, then a long tail of 8-20.
COUNTS = (160, 110, 80, 55, 40, 30, 24, 20, 18, 16, 14, 12, 12, 10, 10, 9, 8, 8)
COMPANIES = (
    "ООО «Ромашка»",
    "АО «Вектор»",
    "ИП Иванов А.С.",
    "ООО «СтройМаркет»",
    "ООО «Техносфера»",
    "ПАО «Северный банк»",
    "ООО «Логистик-Про»",
    "АО «Альфа-Трейд»",
)
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


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        n=rng.randint(1, 9999),
        d=f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.2026",
        m=rng.choice(MONTHS) + " 2026",
        q=rng.randint(1, 4),
        s=f"{rng.randint(1_000, 2_000_000):,}".replace(",", " "),
        c=rng.choice(COMPANIES),
    )


def generate(seed: int = 7, scale: float = 1.0) -> list[tuple[str, str]]:
    """(comment, code) rows, shuffled; `scale` multiplies the head counts (tail stays >= 8)."""
    rng = random.Random(seed)
    rows = []
    for (code, templates), count in zip(CODES.items(), COUNTS, strict=True):
        n = max(8, round(count * scale)) if count > 20 else count
        for _ in range(n):
            text = _fill(rng.choice(templates), rng)
            if rng.random() < 0.15:
                text = text.lower()
            rows.append((text, code))
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
