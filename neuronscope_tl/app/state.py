"""Settings and state of one running app: the model, the lock that serialises model work, caches, last result.

The REST router (:mod:`.api`) and the Gradio UI (:mod:`.ui`) both call the operations here, so each request
kind is checked, locked and computed in one place. The operations only enforce the app's size limits and call
one library function each; every number comes from ``neuronscope_tl``.

TransformerLens hooks live on the model object, so two analyses must never run on the same model at the same
time: every operation that runs the model holds ``AppState.lock``. A request that waits longer than
``AppSettings.lock_timeout_s`` for it is refused with :class:`Busy` (HTTP 503) rather than piling up forever.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import pandas as pd

from .. import activations, candidates, curves, evaluation, impact, pipelines, scores, scoring, selection, texts, weights
from ..impact import BatchAnalysis, ImpactResult
from ..metrics import ImpactThresholds
from ..models import mlp_info, model_name

EXPORT_TYPES = ("weight", "impact")


@dataclass
class AppSettings:
    """Limits of the app. Each is enforced on the REST API and in the UI alike.

    Args:
        max_texts: texts per request (importance and batch analysis).
        max_tokens: tokens per request, summed over its texts (BOS included). A text longer than the model's
            context is refused by the library itself.
        max_candidates: candidates per batch analysis (it runs 2 x candidates + 1 forwards per text).
        max_batch_size: texts per forward pass.
        max_top_k: critical neurons returned by neuron importance.
        max_body_bytes: size of a REST request body.
        max_calib_tokens: calibration tokens of a pruning curve or a pruned download in the demo.
        lock_timeout_s: how long a request waits for the model before it is refused (HTTP 503).
        ui_concurrency: Gradio events handled at once (they still queue on the model lock).
        thresholds: verdict thresholds of every impact result.
    """

    max_texts: int = 16
    max_tokens: int = 4096
    max_candidates: int = 32
    max_batch_size: int = 16
    max_top_k: int = 100
    max_body_bytes: int = 1_000_000
    max_calib_tokens: int = 8192
    lock_timeout_s: float = 120.0
    ui_concurrency: int = 4
    thresholds: ImpactThresholds = field(default_factory=ImpactThresholds)

    def __post_init__(self):
        for name in ("max_texts", "max_tokens", "max_candidates", "max_batch_size", "max_top_k", "max_body_bytes", "max_calib_tokens", "ui_concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not self.lock_timeout_s > 0:
            raise ValueError(f"lock_timeout_s must be > 0, got {self.lock_timeout_s!r}.")


class LimitExceeded(ValueError):
    """A request is larger than an :class:`AppSettings` limit (HTTP 413)."""


class NoResultYet(ValueError):
    """An impact export was asked for before any impact analysis ran (HTTP 409)."""


class Busy(RuntimeError):
    """The model stayed busy longer than ``lock_timeout_s`` (HTTP 503)."""


class AppState:
    """One model with its lock, the cached weight analysis and the last impact result (for export)."""

    def __init__(self, model, settings: Optional[AppSettings] = None):
        self.model = model
        self.settings = settings or AppSettings()
        self.lock = threading.Lock()
        self._weights: Optional[weights.WeightAnalysis] = None
        self._weight_summary: Optional[dict] = None
        self.last_impact: Optional[Union[ImpactResult, BatchAnalysis]] = None
        self._downloads: Optional[Path] = None
        self._score_pass: Optional[Tuple[Tuple[str, ...], scoring.ScorePass]] = None
        self._calibration: dict = {}  # (calib_tokens, with_grams) -> selection.Calibration

    def downloads_dir(self) -> Path:
        """A private temporary directory for the UI's download files (never a path a client chose)."""
        if self._downloads is None:
            self._downloads = Path(tempfile.mkdtemp(prefix="neuronscope_app_"))
        return self._downloads

    @property
    def model_name(self) -> str:
        return model_name(self.model)

    @property
    def info(self):
        return mlp_info(self.model)

    @contextmanager
    def model_work(self) -> Iterator[None]:
        """Hold the model lock for one analysis; refuse with :class:`Busy` after ``lock_timeout_s``."""
        if not self.lock.acquire(timeout=self.settings.lock_timeout_s):
            raise Busy(f"the model is busy with other analyses; waited {self.settings.lock_timeout_s:g} s, try again later.")
        try:
            yield
        finally:
            self.lock.release()

    # ------------------------------------------------------------------------------------------- limits

    def check_texts(self, input_texts: Union[str, Sequence[str]]) -> List[str]:
        """Validate texts (library rules) and enforce ``max_texts`` and ``max_tokens``. Call under the lock."""
        checked = texts.check_texts(input_texts)
        s = self.settings
        if len(checked) > s.max_texts:
            raise LimitExceeded(f"{len(checked)} texts given; at most {s.max_texts} texts per request.")
        n_tokens = sum(int(t.numel()) for t in texts.tokenize(self.model, checked))
        if n_tokens > s.max_tokens:
            raise LimitExceeded(f"the texts have {n_tokens} tokens; at most {s.max_tokens} tokens per request.")
        return checked

    def check_batch_size(self, batch_size: int) -> int:
        batch_size = impact.check_batch_size(batch_size)
        if batch_size > self.settings.max_batch_size:
            raise LimitExceeded(f"batch_size {batch_size} is too large; at most {self.settings.max_batch_size}.")
        return batch_size

    # ------------------------------------------------------------------------------------------- operations

    def weight_analysis(self) -> weights.WeightAnalysis:
        """The weight analysis, computed once per app (weights never change while it runs)."""
        with self.model_work():
            if self._weights is None:
                self._weights = weights.analyze_weights(self.model)
            return self._weights

    def weight_summary(self) -> dict:
        """``WeightAnalysis.summary()``, kept: it converts the whole per-neuron table, ~0.8 s on the default model."""
        wa = self.weight_analysis()
        if self._weight_summary is None:
            self._weight_summary = wa.summary()
        return self._weight_summary

    def candidates(self, threshold: float) -> pd.DataFrame:
        """Weight-ranked candidates with their activation evidence (:func:`candidates.assess_candidates`)."""
        weights.check_percentile(threshold)
        table = self.weight_analysis().neurons
        with self.model_work():
            return candidates.assess_candidates(self.model, threshold, weight_table=table)

    def impact(self, layer_index: int, neuron_indices: Sequence[int], input_text: str, ablation: str = "zero", progress: bool = False) -> ImpactResult:
        with self.model_work():
            text = self.check_texts([input_text])
            result = impact.simulate_pruning(
                self.model, layer_index, neuron_indices, text, ablation, thresholds=self.settings.thresholds,
                token_detail=True, progress=progress,
            )
            self.last_impact = result
            return result

    def importance(self, layer_index: int, input_texts: Sequence[str], top_k: int = 10, progress: bool = False) -> activations.NeuronImportance:
        if isinstance(top_k, int) and top_k > self.settings.max_top_k:
            raise LimitExceeded(f"top_k {top_k} is too large; at most {self.settings.max_top_k}.")
        with self.model_work():
            checked = self.check_texts(input_texts)
            return activations.neuron_importance(self.model, checked, layer_index=layer_index, top_k=top_k, progress=progress)

    def batch(self, candidates: Any, input_texts: Sequence[str], batch_size: int = 1, ablation: str = "zero", progress: bool = False) -> BatchAnalysis:
        if candidates is not None and len(candidates) > self.settings.max_candidates:
            raise LimitExceeded(f"{len(candidates)} candidates given; at most {self.settings.max_candidates} per batch analysis.")
        batch_size = self.check_batch_size(batch_size)
        with self.model_work():
            checked = self.check_texts(input_texts)
            result = impact.batch_analysis(
                self.model, candidates, checked, batch_size, ablation, thresholds=self.settings.thresholds, progress=progress
            )
            self.last_impact = result
            return result

    def top_contexts(self, layer_index: int, neuron_index: int, input_texts: Sequence[str], window: int = scoring.DEFAULT_CONTEXT) -> pd.DataFrame:
        """A neuron's top-activating token contexts over the texts, from one scoring pass (kept for the same texts)."""
        impact.check_layer(self.model, layer_index)
        impact.check_neurons(self.model, [neuron_index], layer_index)
        with self.model_work():
            checked = tuple(self.check_texts(input_texts))
            if self._score_pass is None or self._score_pass[0] != checked:
                self._score_pass = (checked, scoring.score_pass(self.model, list(checked)))
            return scoring.top_contexts(self._score_pass[1], layer_index, neuron_index, window)

    def _calibrate(self, calib_tokens: int, with_grams: bool) -> "selection.Calibration":
        if isinstance(calib_tokens, bool) or not isinstance(calib_tokens, int) or not 1 <= calib_tokens <= self.settings.max_calib_tokens:
            raise LimitExceeded(f"calibration tokens must be an integer in [1, {self.settings.max_calib_tokens}], got {calib_tokens!r}.")
        key = (calib_tokens, with_grams)
        if key not in self._calibration:
            have = next((c for (t, g), c in self._calibration.items() if t == calib_tokens and g), None)
            self._calibration[key] = have or selection.calibrate(self.model, calib_tokens=calib_tokens, with_grams=with_grams)
        return self._calibration[key]

    def curve(self, methods: Sequence[str], sparsities: Sequence[float], scope: str, ablation: str, calib_tokens: int,
              every: int = evaluation.DEFAULT_EVERY, progress: bool = False) -> "curves.CurveResult":
        """A pruning curve on the default evaluation protocol (one calibration pass kept per token budget)."""
        methods = [scores.check_method(m) for m in methods]
        if not methods:
            raise ValueError(f"choose at least one method of {', '.join(scores.method_names())}.")
        if not sparsities:
            raise ValueError("give at least one sparsity in [0, 1).")
        for x in sparsities:
            selection.check_sparsity(x)
        selection.check_scope(scope)
        impact.check_ablation(ablation)
        with self.model_work():
            cal = self._calibrate(calib_tokens, scores.needs_grams(methods))
            window = min(evaluation.DEFAULT_WINDOW, self.info.n_ctx)
            return curves.prune_curve(
                self.model, methods, sparsities, scope, ablation, window=window, every=every, calibration=cal, progress=progress
            )

    def prune(self, method: str, sparsity: float, scope: str, ablation: str, calib_tokens: int) -> Path:
        """Physically prune a copy of the model into a fresh private directory and return a zip of it
        (:func:`~neuronscope_tl.pipelines.prune_and_save` on the app's kept calibration, no evaluation)."""
        scores.check_method(method)
        selection.check_sparsity(sparsity)
        selection.check_scope(scope)
        impact.check_ablation(ablation)
        with self.model_work():
            cal = self._calibrate(calib_tokens, scores.get(method).needs_grams)
            work = Path(tempfile.mkdtemp(prefix="pruned_", dir=self.downloads_dir()))
            out = work / f"pruned-{method}-{ablation}-{scope}-{sparsity:g}"
            pipelines.prune_and_save(self.model, sparsity, out, method, scope, ablation, calibration=cal, measure_latency=False)
            return Path(shutil.make_archive(str(out), "zip", root_dir=out))

    def export_document(self, export_type: str) -> Tuple[str, dict]:
        """(file name, JSON document) of the weight analysis or of the last impact or batch analysis."""
        if export_type not in EXPORT_TYPES:
            raise ValueError(f"unknown export type {export_type!r}; valid types are {', '.join(EXPORT_TYPES)}.")
        if export_type == "weight":
            return "weight_analysis.json", weights.weight_document(self.weight_analysis())
        result = self.last_impact
        if result is None:
            raise NoResultYet("no impact analysis has run yet; run an impact or batch analysis before exporting its results.")
        name = "impact_analysis.json" if isinstance(result, ImpactResult) else "batch_analysis.json"
        return name, impact.impact_document(result)
