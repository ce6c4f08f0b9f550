"""The libraries' misleading messages are dropped; their other warnings still show."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.logging import (
    FreshHeadLoadReportFilter,
    configure_logging,
    quiet_library_noise,
)

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
HF_LOGGER = "transformers.modeling_utils"
# bitsandbytes 0.50's message, as it logs it at import on a CPU with AVX512-BF16.
BNB_KERNELS = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
    "already `pip install kernels` and the kernels >= 0.11.1"
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def hf_records() -> Iterator[_Records]:
    """What transformers' model loader logs (through its own, non-propagating handler)."""
    handler = _Records()
    logger = logging.getLogger(HF_LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever verbosity transformers was given elsewhere
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord(HF_LOGGER, logging.WARNING, __file__, 1, text, None, None)


def test_the_kernels_notice_of_bitsandbytes_is_dropped_and_its_other_warnings_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet_library_noise()
    logger = logging.getLogger(BNB_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning(BNB_KERNELS, ModuleNotFoundError("No module named 'kernels'"))
        logger.warning("Failed to load the CPU library: libbitsandbytes_cpu.so not found")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load the CPU library: libbitsandbytes_cpu.so not found"
    ]


def test_configure_logging_and_calling_again_install_each_filter_once() -> None:
    configure_logging("plain", "WARNING")
    quiet_library_noise()
    for name in (BNB_LOGGER, HF_LOGGER):
        assert len(logging.getLogger(name).filters) == 1, name


def _tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_a_load_report_of_a_fresh_head_alone_is_dropped(
    tmp_path: Path, hf_records: _Records
) -> None:
    from transformers import AutoModelForSequenceClassification

    quiet_library_noise()
    folder = _tiny_bert(tmp_path / "encoder")
    AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert not [m for m in hf_records.messages if "LOAD REPORT" in m]


def test_a_load_report_that_misses_more_than_the_head_is_kept(
    tmp_path: Path, hf_records: _Records
) -> None:
    from transformers import AutoModelForSequenceClassification

    quiet_library_noise()
    folder = _tiny_bert(tmp_path / "encoder")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    missing = next(key for key in state if "attention.self.query.weight" in key)
    del state[missing]
    save_file(state, weights, metadata={"format": "pt"})
    AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    reports = [m for m in hf_records.messages if "LOAD REPORT" in m]
    assert len(reports) == 1
    assert "attention.self.query.weight" in reports[0] and "classifier.weight" in reports[0]


@pytest.mark.parametrize(
    ("row", "kept"),
    [
        ("classifier.weight | MISSING | ", False),
        ("score.weight      | MISSING | ", False),
        ("pre_classifier.weight | MISSING | ", True),  # DistilBERT's: not a head we train
        ("classifier.weight | MISMATCH | Reinit due to size mismatch", True),
        ("bert.pooler.dense.weight | UNEXPECTED | ", True),
    ],
)
def test_the_report_filter_reads_every_row(row: str, kept: bool) -> None:
    bold, red, reset = "\x1b[1m", "\x1b[31m", "\x1b[0m"
    report = (
        f"{bold}BertForSequenceClassification LOAD REPORT{reset} from: /models/x\n"
        "Key | Status | \n------------------+---------+-\n"
        f"classifier.bias | {red}MISSING{reset} | \n{row}\n\n"
        "Notes:\n- MISSING:\tthose params were newly initialized because missing from the "
        "checkpoint. Consider training on your downstream task."
    )
    noise = FreshHeadLoadReportFilter()
    assert noise.filter(_record(report)) is kept
    assert noise.filter(_record("`torch_dtype` is deprecated! Use `dtype` instead!")) is True


def test_the_deprecated_property_peft_reads_warns_no_more(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(
        _tiny_bert(tmp_path / "encoder"), num_labels=2
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        assert model.is_gradient_checkpointing is False  # what PEFT reads when it wraps
        warnings.warn("another library's deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another library's deprecation"]
