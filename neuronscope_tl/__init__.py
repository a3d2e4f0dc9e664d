"""neuronscope_tl: decide which MLP neurons of a language model can be pruned, and prove it by measurement.

A plugin for TransformerLens 3.x and 4.x: every analysis takes a ``TransformerBridge`` or (TransformerLens 3.x) a
``HookedTransformer`` and works through its hook points (``blocks.{l}.mlp.hook_post``, [batch, pos, d_mlp]), with
what differs between model kinds in :mod:`neuronscope_tl.arch`; simulated pruning never edits weights.
"""

from .ablation import ablate_each
from .analyzers import MultiModelLoader, PruningImpactAnalyzer, WeightAnalyzer
from .candidates import PruningCandidate, activation_evidence, assess_candidates
from .activations import NeuronAccumulator, calibration_stats, NeuronImportance, neuron_importance, stream_activations
from ._version import __version__ as __version__
from .compare import Comparison, compare_models, comparison_table, plot_comparison, write_comparison
from .curves import CurveResult, prune_curve
from .evaluation import evaluate_perplexity
from .export import SCHEMA_VERSION, report_document, write_csv, write_json
from .hooks import attached_hooks, hook_count
from .impact import (
    BatchAnalysis,
    ImpactResult,
    batch_analysis,
    export_impact,
    impact_document,
    simulate_pruning,
)
from .metrics import ImpactThresholds, token_kl, token_nll
from .surgery import PrunedModel, PruneSpec, prune_model
from .models import DEFAULT_MODEL_NAME, load_model, mlp_info
from .search import SearchResult, search_pruning
from .scoring import ScoreAccumulator, ScorePass, score_neurons, score_pass, top_contexts, validate_scores
from .texts import EXAMPLE_TEXTS, calibration_texts, evaluation_texts, lee_articles
from .weights import WeightAnalysis, analyze_weights, export_weights, neuron_weight_table, pruning_candidates


__all__ = [
    "ScoreAccumulator",
    "ScorePass",
    "ablate_each",
    "score_neurons",
    "score_pass",
    "top_contexts",
    "validate_scores",
    "PruningCandidate",
    "activation_evidence",
    "assess_candidates",
    "calibration_stats",
    "BatchAnalysis",
    "Comparison",
    "CurveResult",
    "compare_models",
    "comparison_table",
    "plot_comparison",
    "write_comparison",
    "PruneSpec",
    "PrunedModel",
    "SearchResult",
    "evaluate_perplexity",
    "prune_curve",
    "prune_model",
    "search_pruning",
    "DEFAULT_MODEL_NAME",
    "EXAMPLE_TEXTS",
    "ImpactResult",
    "ImpactThresholds",
    "MultiModelLoader",
    "NeuronAccumulator",
    "NeuronImportance",
    "PruningImpactAnalyzer",
    "SCHEMA_VERSION",
    "WeightAnalysis",
    "WeightAnalyzer",
    "analyze_weights",
    "attached_hooks",
    "batch_analysis",
    "calibration_texts",
    "evaluation_texts",
    "export_impact",
    "export_weights",
    "hook_count",
    "impact_document",
    "lee_articles",
    "load_model",
    "mlp_info",
    "neuron_importance",
    "neuron_weight_table",
    "pruning_candidates",
    "report_document",
    "simulate_pruning",
    "stream_activations",
    "token_kl",
    "token_nll",
    "write_csv",
    "write_json",
]
