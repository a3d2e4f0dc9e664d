"""The class-based API: ``MultiModelLoader``, ``WeightAnalyzer`` and ``PruningImpactAnalyzer``.

Thin classes over the functions of :mod:`~neuronscope_tl.models`, :mod:`~neuronscope_tl.weights`,
:mod:`~neuronscope_tl.candidates` and :mod:`~neuronscope_tl.impact`, for code written in the NeuronScope style::

    model, tokenizer = MultiModelLoader().load_model("SmolLM2-135M-Instruct")
    candidates = WeightAnalyzer(model).identify_pruning_candidates(threshold_percentile=10.0)
    safe = [c for c in candidates if c.is_pruning_candidate]
    impact = PruningImpactAnalyzer(model, tokenizer).simulate_neuron_pruning(0, [0, 1, 2], "Hello world")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch

from .activations import DEFAULT_CALIB_TOKENS
from .candidates import (
    DEFAULT_SAFE_PERCENTILE,
    DEFAULT_THRESHOLD_PERCENTILE,
    PruningCandidate,
    assess_candidates,
    candidate_objects,
)
from .impact import BatchAnalysis, ImpactResult, batch_analysis, export_impact, simulate_pruning
from .metrics import ImpactThresholds
from .models import load_model
from .texts import DEFAULT_BATCH_SIZE
from .weights import WeightAnalysis, analyze_weights, export_weights


class MultiModelLoader:
    """``MultiModelLoader().load_model(name)`` returns ``(model, tokenizer)``; see :func:`load_model` for names."""

    def __init__(self, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False):
        self.dtype = dtype
        self.device = device
        self.trust_remote_code = trust_remote_code

    def load_model(self, name: Optional[str] = None):
        model = load_model(name, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code)
        return model, model.tokenizer


class WeightAnalyzer:
    """Weight statistics, sparsity and pruning candidates of one model.

    Args:
        model: a TransformerLens model.
        near_zero_threshold: |w| below this counts as near zero (default 0.01).
        calib_texts / calib_tokens: the texts (default: Lee calibration split) and token count of the calibration
            pass that gives each candidate its activation evidence.
    """

    def __init__(
        self,
        model,
        near_zero_threshold: float = 0.01,
        calib_texts: Optional[Sequence[str]] = None,
        calib_tokens: int = DEFAULT_CALIB_TOKENS,
    ):
        self.model = model
        self.near_zero_threshold = near_zero_threshold
        self.calib_texts = calib_texts
        self.calib_tokens = calib_tokens
        self._analysis: Optional[WeightAnalysis] = None

    @property
    def analysis(self) -> WeightAnalysis:
        if self._analysis is None:
            self._analysis = analyze_weights(self.model, self.near_zero_threshold)
        return self._analysis

    def get_sparsity_analysis(self) -> dict:
        """Summary dict: ``overall_sparsity``, ``total_parameters``, ``near_zero_fraction``, per-layer stats, ..."""
        return self.analysis.summary()

    def identify_pruning_candidates(
        self, threshold_percentile: float = DEFAULT_THRESHOLD_PERCENTILE, safe_percentile: float = DEFAULT_SAFE_PERCENTILE
    ) -> List[PruningCandidate]:
        """Neurons at or below the ``threshold_percentile`` of mean |w| in their layer, lowest first, each with its
        activation evidence; ``is_pruning_candidate`` marks those whose activation score is within the layer's
        lowest ``safe_percentile`` percent (see :mod:`neuronscope_tl.candidates`)."""
        table = assess_candidates(
            self.model, threshold_percentile, safe_percentile, self.calib_texts, self.calib_tokens, self.analysis.neurons
        )
        return candidate_objects(table)

    def export_weight_analysis(self, path: Union[str, Path]) -> List[Path]:
        """Write the analysis as JSON at ``path`` and its per-neuron table as CSV beside it."""
        return export_weights(self.analysis, path)


class PruningImpactAnalyzer:
    """Simulated pruning of one model: ``simulate_neuron_pruning`` and ``batch_pruning_analysis``."""

    def __init__(
        self, model, tokenizer=None, thresholds: Optional[ImpactThresholds] = None, calib_texts: Optional[Sequence[str]] = None
    ):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.thresholds = thresholds or ImpactThresholds()
        self.calib_texts = calib_texts
        self.last_result: Optional[Union[ImpactResult, BatchAnalysis]] = None

    def simulate_neuron_pruning(
        self, layer_index: int, neuron_indices: Sequence[int], input_text: str, ablation: str = "zero"
    ) -> ImpactResult:
        result = simulate_pruning(
            self.model,
            layer_index,
            neuron_indices,
            input_text,
            ablation,
            thresholds=self.thresholds,
            calib_texts=self.calib_texts,
        )
        self.last_result = result
        return result

    def batch_pruning_analysis(
        self, input_texts: Sequence[str], candidates: Any, batch_size: int = DEFAULT_BATCH_SIZE, ablation: str = "zero"
    ) -> BatchAnalysis:
        result = batch_analysis(
            self.model, candidates, input_texts, batch_size, ablation, thresholds=self.thresholds, calib_texts=self.calib_texts
        )
        self.last_result = result
        return result

    def export_impact_analysis(self, path: Union[str, Path]) -> List[Path]:
        if self.last_result is None:
            raise ValueError("no impact analysis has run yet; call simulate_neuron_pruning or batch_pruning_analysis first.")
        return export_impact(self.last_result, path)
