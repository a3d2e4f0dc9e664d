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

import numpy as np
import pandas as pd

from .. import (
    activations,
    candidates,
    compare,
    curves,
    domains,
    evaluation,
    impact,
    models,
    pipelines,
    recipes,
    scores,
    scoring,
    selection,
    surgery,
    texts,
    weights,
)
from ..impact import BatchAnalysis, ImpactResult
from ..metrics import ImpactThresholds
from ..models import mlp_info, model_name
from . import picker
from .live import LivePruning, LiveResult

EXPORT_TYPES = ("weight", "impact")
THIS_MODEL = "this model"  # how a comparison names the app's own model, whatever it is called


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
        max_basket: neurons in the demo's candidate basket.
        compare_models: models a comparison may load by name, besides the app's own (names or local directories
            for ``load_model``); None for the embedded models installed here. A request can name no other.
        warm_start: compute the weight analysis in the background at start-up, so the first call does not wait.
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
    max_calib_tokens: int = field(default_factory=lambda: recipes.RECOMMENDED_CALIB_TOKENS)
    max_basket: int = 512
    compare_models: Optional[List[str]] = field(default=None, metadata={"default_text": "the embedded models installed here"})
    warm_start: bool = True
    lock_timeout_s: float = 120.0
    ui_concurrency: int = 4
    thresholds: ImpactThresholds = field(default_factory=ImpactThresholds)

    def __post_init__(self):
        for name in (
            "max_texts",
            "max_tokens",
            "max_candidates",
            "max_batch_size",
            "max_top_k",
            "max_body_bytes",
            "max_calib_tokens",
            "max_basket",
            "ui_concurrency",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not self.lock_timeout_s > 0:
            raise ValueError(f"lock_timeout_s must be > 0, got {self.lock_timeout_s!r}.")
        if self.compare_models is not None:
            if isinstance(self.compare_models, str) or not all(isinstance(m, str) and m.strip() for m in self.compare_models):
                raise ValueError(f"compare_models must be a list of model names, got {self.compare_models!r}.")
            self.compare_models = list(self.compare_models)


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
        self._calibration: dict = {}  # (calib_tokens, with_grams, with_gradients) -> selection.Calibration
        self.live_engine = LivePruning(model, lambda methods: self._calibrate(self.default_calib_tokens, methods))

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

    def impact(
        self, layer_index: int, neuron_indices: Sequence[int], input_text: str, ablation: str = "zero", progress: bool = False
    ) -> ImpactResult:
        with self.model_work():
            text = self.check_texts([input_text])
            result = impact.simulate_pruning(
                self.model,
                layer_index,
                neuron_indices,
                text,
                ablation,
                thresholds=self.settings.thresholds,
                token_detail=True,
                progress=progress,
            )
            self.last_impact = result
            return result

    def importance(
        self, layer_index: int, input_texts: Sequence[str], top_k: int = 10, progress: bool = False
    ) -> activations.NeuronImportance:
        if isinstance(top_k, int) and top_k > self.settings.max_top_k:
            raise LimitExceeded(f"top_k {top_k} is too large; at most {self.settings.max_top_k}.")
        with self.model_work():
            checked = self.check_texts(input_texts)
            return activations.neuron_importance(self.model, checked, layer_index=layer_index, top_k=top_k, progress=progress)

    def batch(
        self, candidates: Any, input_texts: Sequence[str], batch_size: int = 1, ablation: str = "zero", progress: bool = False
    ) -> BatchAnalysis:
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

    def top_contexts(
        self, layer_index: int, neuron_index: int, input_texts: Sequence[str], window: int = scoring.DEFAULT_CONTEXT
    ) -> pd.DataFrame:
        """A neuron's top-activating token contexts over the texts, from one scoring pass (kept for the same texts)."""
        impact.check_layer(self.model, layer_index)
        impact.check_neurons(self.model, [neuron_index], layer_index)
        with self.model_work():
            checked = tuple(self.check_texts(input_texts))
            if self._score_pass is None or self._score_pass[0] != checked:
                self._score_pass = (checked, scoring.score_pass(self.model, list(checked)))
            return scoring.top_contexts(self._score_pass[1], layer_index, neuron_index, window)

    @property
    def default_calib_tokens(self) -> int:
        """The calibration size of the CLI (``recipes.RECOMMENDED_CALIB_TOKENS``), within the app's limit."""
        return min(recipes.RECOMMENDED_CALIB_TOKENS, self.settings.max_calib_tokens)

    def _calibrate(self, calib_tokens: int, methods: Sequence[str]) -> "selection.Calibration":
        """A calibration that serves ``methods`` on the default calibration texts (as the CLI's), kept per token
        budget; one computed with more (Gram matrices, gradients) serves a request for less. Call under the lock."""
        if (
            isinstance(calib_tokens, bool)
            or not isinstance(calib_tokens, int)
            or not 1 <= calib_tokens <= self.settings.max_calib_tokens
        ):
            raise LimitExceeded(
                f"calibration tokens must be an integer in [1, {self.settings.max_calib_tokens}], got {calib_tokens!r}."
            )
        grams, grads = scores.needs_grams(methods), scores.needs_gradients(methods)
        for (t, g, d), cal in self._calibration.items():
            if t == calib_tokens and (g or not grams) and (d or not grads):
                return cal
        cal = selection.calibrate_for(self.model, methods, calib_tokens=calib_tokens)
        self._calibration[(calib_tokens, grams, grads)] = cal
        return cal

    # ------------------------------------------------------------------------------------------- picking neurons

    @staticmethod
    def map_methods() -> Tuple[str, ...]:
        """Registered scores the neuron map can show: those with a plain per-neuron score, random excluded."""
        return tuple(s.name for s in scores.registered() if s.rank is not None and not s.random)

    def score_map(self, method: str, ablation: str = "zero") -> np.ndarray:
        """``[n_layers, d_mlp]`` values of a registered score on the default calibration (low = prune first)."""
        if method not in self.map_methods():
            raise ValueError(f"the map shows one of {', '.join(self.map_methods())}; got {method!r}.")
        impact.check_ablation(ablation)
        with self.model_work():
            cal = self._calibrate(self.default_calib_tokens, [method])
            return scores.get(method).scores(cal, ablation).numpy()

    def select(self, rule_text: str, ablation: str = "zero") -> List[Tuple[int, int]]:
        """The neurons a rule such as "lowest 5% of layer 12 by wanda" selects (:mod:`.picker`)."""
        info = self.info
        rule = picker.parse_rule(rule_text, info.n_layers, info.d_mlp, self.map_methods())
        return picker.apply_rule(rule, self.score_map(rule.method, ablation))

    def basket_table(self, basket: Sequence[Tuple[int, int]], impacts: Optional[pd.DataFrame] = None) -> pd.DataFrame:
        """The basket with each neuron's calibration scores (every map score) and, when measured, its impact."""
        with self.model_work():
            cal = self._calibrate(self.default_calib_tokens, list(self.map_methods()))
        table = cal.scores.copy()
        table["magnitude"] = cal.magnitude.reshape(-1).numpy()
        columns = [c for c in dict.fromkeys(["magnitude", "mean_abs", "wanda", "fluctuation"]) if c in table]
        return picker.basket_table(basket, table, columns, impacts)

    def prune_neurons(self, basket: Sequence[Tuple[int, int]], ablation: str = "zero") -> Path:
        """Physically prune exactly the basket's neurons from a copy of the model (mean ablation folds each
        neuron's calibration mean into an output bias) into a fresh private directory; returns a zip of it."""
        impact.check_ablation(ablation)
        if not basket:
            raise ValueError("the basket is empty; pick neurons on the Neuron map tab first.")
        neurons: dict = {}
        for layer, neuron in basket:
            neurons.setdefault(int(layer), []).append(int(neuron))
        with self.model_work():
            means = self._calibrate(self.default_calib_tokens, []).means if ablation == "mean" else None
            spec = surgery.make_spec(self.model, neurons, ablation, means)
            work = Path(tempfile.mkdtemp(prefix="pruned_", dir=self.downloads_dir()))
            out = work / f"pruned-basket-{len(basket)}-{ablation}"
            surgery.save_pruned(self.model, spec, out, measure_latency=False)
            return Path(shutil.make_archive(str(out), "zip", root_dir=out))

    def live(self, method: str, scope: str, sparsity: float, ablation: Optional[str], prompt: str) -> LiveResult:
        """One live-pruning measurement (:class:`.LivePruning`: calibration, subset and dense numbers kept)."""
        with self.model_work():
            return self.live_engine.run(method, scope, sparsity, ablation, prompt)

    def warm(self) -> None:
        """Compute the weight analysis (the slowest first call) now; for a background thread at start-up."""
        try:
            self.weight_summary()
        except Busy:
            pass

    def curve(
        self,
        methods: Sequence[str],
        sparsities: Sequence[float],
        scope: str,
        ablation: str,
        calib_tokens: int,
        progress: bool = False,
    ) -> "curves.CurveResult":
        """A pruning curve over the default evaluation domains, each measured separately on
        :data:`~neuronscope_tl.curves.CURVE_DOMAIN_WINDOWS` windows (as the CLI's ``curve``), with the best method chosen on the
        out-of-domain sets; one calibration pass kept per token budget."""
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
            cal = self._calibrate(calib_tokens, methods)
            window = min(evaluation.DEFAULT_WINDOW, self.info.n_ctx)
            return curves.prune_curve(
                self.model,
                methods,
                sparsities,
                scope,
                ablation,
                window=window,
                calibration=cal,
                progress=progress,
                domains=domains.default_evaluation_sets(),
                domain_windows_max=curves.CURVE_DOMAIN_WINDOWS,
            )

    def prune(self, method: Optional[str], sparsity: float, scope: str, ablation: Optional[str], calib_tokens: int) -> Path:
        """Physically prune a copy of the model into a fresh private directory and return a zip of it
        (:func:`~neuronscope_tl.pipelines.prune_and_save`, no evaluation). ``method=None`` is the CLI's recommended
        recipe exactly (its own calibration, as ``neuronscope-tl prune``); a given method uses the app's kept
        one-shot calibration."""
        if method is not None:
            scores.check_method(method)
            impact.check_ablation(ablation)
        selection.check_sparsity(sparsity)
        selection.check_scope(scope)
        with self.model_work():
            cal = self._calibrate(calib_tokens, [method]) if method is not None else None
            if cal is None and not (isinstance(calib_tokens, int) and 1 <= calib_tokens <= self.settings.max_calib_tokens):
                raise LimitExceeded(
                    f"calibration tokens must be an integer in [1, {self.settings.max_calib_tokens}], got {calib_tokens!r}."
                )
            work = Path(tempfile.mkdtemp(prefix="pruned_", dir=self.downloads_dir()))
            out = work / f"pruned-{method or 'recommended'}-{ablation or 'recommended'}-{scope}-{sparsity:g}"
            pipelines.prune_and_save(
                self.model,
                sparsity,
                out,
                method,
                scope,
                None if method is None else ablation,
                calib_tokens=calib_tokens,
                calibration=cal,
                measure_latency=False,
            )
            return Path(shutil.make_archive(str(out), "zip", root_dir=out))

    # ------------------------------------------------------------------------------------------- comparing models

    def compare_choices(self) -> List[str]:
        """What a comparison may name: "this model", the app's model by its name, and the models the app may load
        (``AppSettings.compare_models``)."""
        loadable = self.settings.compare_models
        loadable = models.embedded_models() if loadable is None else loadable
        return list(dict.fromkeys([THIS_MODEL, self.model_name, *(models.canonical_name(m) for m in loadable)]))

    def _compare_entries(self, model_names: Union[str, Sequence[str]]) -> list:
        """The models a comparison lists, in order: ``self.model`` for "this model" or the app model's name (any
        alias), a name to load for the others. ValueError naming the choices for an unknown name, none or a repeat."""
        if isinstance(model_names, str):
            model_names = model_names.split(",")
        if not isinstance(model_names, (list, tuple)) or not all(isinstance(m, str) for m in model_names):
            raise ValueError(f"models must be model names separated by commas, got {texts.show(model_names)}.")
        choices = self.compare_choices()
        names = [m.strip() for m in model_names if m.strip()]
        if not names:
            raise ValueError(f"name at least one model to compare; choose from {', '.join(choices)}.")
        entries, seen = [], set()
        for name in names:
            canonical = THIS_MODEL if name.lower() == THIS_MODEL else models.canonical_name(name)
            if canonical not in choices:
                raise ValueError(f"unknown model {texts.show(name, 120)}; choose from {', '.join(choices)}.")
            own = canonical in (THIS_MODEL, self.model_name)
            key = self.model_name if own else canonical
            if key in seen:
                raise ValueError(f"model {texts.show(name, 120)} is listed twice; name each model once.")
            seen.add(key)
            entries.append(self.model if own else canonical)
        return entries

    def _token_budget(self, value: Optional[int], default: int, limit: int, what: str) -> int:
        """A token budget of a comparison: ``default`` capped at ``limit`` when None; otherwise within [1, limit]."""
        if value is None:
            return min(default, limit)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be an integer in [1, {limit}], got {value!r}.")
        if value > limit:
            raise LimitExceeded(f"{what} {value} is too large; at most {limit}.")
        return value

    def compare(
        self,
        model_names: Union[str, Sequence[str]],
        methods: Sequence[str] = compare.DEFAULT_METHODS,
        sparsities: Sequence[float] = compare.DEFAULT_SPARSITIES,
        ablation: str = compare.DEFAULT_ABLATION,
        calib_tokens: Optional[int] = None,
        eval_tokens: Optional[int] = None,
        progress: bool = False,
    ) -> "compare.Comparison":
        """Compare models side by side on the default texts (:func:`~neuronscope_tl.compare.compare_models`).

        ``model_names`` is a comma-separated list (or a list) of :meth:`compare_choices`; models other than the
        app's own are loaded one at a time and released. Token budgets default to the library's
        (``compare.DEFAULT_COMPARE_CALIB_TOKENS`` and ``DEFAULT_EVAL_TOKENS``) within the app's limits
        (``max_calib_tokens``; ``max_tokens``, the tokens a request may run the model on); a larger one is
        refused with :class:`LimitExceeded`. Everything is checked before any model is loaded or run.
        """
        entries = self._compare_entries(model_names)
        if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or not methods:
            raise ValueError(f"choose at least one method of {', '.join(scores.method_names())}.")
        methods = [scores.check_method(m) for m in methods]
        sparsities = selection.check_sparsities(sparsities)
        impact.check_ablation(ablation)
        calib_tokens = self._token_budget(
            calib_tokens, compare.DEFAULT_COMPARE_CALIB_TOKENS, self.settings.max_calib_tokens, "calibration tokens"
        )
        eval_tokens = self._token_budget(eval_tokens, compare.DEFAULT_EVAL_TOKENS, self.settings.max_tokens, "evaluation tokens")
        with self.model_work():
            return compare.compare_models(
                entries,
                methods=methods,
                sparsities=sparsities,
                ablation=ablation,
                calib_tokens=calib_tokens,
                eval_tokens=eval_tokens,
                progress=progress,
            )

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
