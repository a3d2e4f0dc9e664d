"""Live pruning: a method, a scope and a sparsity -> perplexity on a small fixed subset of every evaluation domain
next to dense, and a greedy continuation of a prompt by the dense and the pruned model, side by side.

Everything slow is done once and kept: the calibration (the app's, shared with its other tabs), the subset's
windows and their dense perplexities, the dense continuation of each prompt, and each selection's
:class:`~neuronscope_tl.surgery.PruneSpec`. A slider move then costs one hook-simulated forward per window and one
per generated token. Selection, hooks and perplexity are the library's (:func:`~neuronscope_tl.selection.build_spec`,
:func:`~neuronscope_tl.surgery.simulation_hooks`, :func:`~neuronscope_tl.evaluation.domain_perplexities`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import pandas as pd
import torch

from .. import evaluation, pipelines, scores, selection
from ..hooks import attached_hooks
from ..impact import check_ablation
from ..surgery import PruneSpec, simulation_hooks

LIVE_WINDOW = 64  # tokens per window of the fixed subset
LIVE_WINDOWS_PER_DOMAIN = 1
LIVE_NEW_TOKENS = 8  # tokens of each continuation
LIVE_MAX_SPARSITY = 0.9  # the slider's end; each selection is first made there, so later moves only take a prefix
DEFAULT_PROMPT = "The city council said on Monday that"
MAX_PROMPT_TOKENS = 64


@dataclass
class LiveResult:
    """One live measurement.

    Attributes:
        method / ablation / scope / sparsity / n_pruned: the pruning simulated.
        table: one row per evaluation domain of the subset: tokens scored, dense and pruned perplexity, ratio.
        geometric_mean: the ratio's geometric mean over the domains.
        prompt / dense_text / pruned_text: the prompt and each model's greedy continuation (new text only).
        timings: seconds spent selecting, measuring and generating in this call (cached parts cost ~0).
    """

    method: str
    ablation: str
    scope: str
    sparsity: float
    n_pruned: int
    table: pd.DataFrame
    geometric_mean: float
    prompt: str
    dense_text: str
    pruned_text: str
    timings: Dict[str, float] = field(default_factory=dict)


def greedy_continuation(model, prompt: str, new_tokens: int, hooks=()) -> str:
    """The model's greedy (arg-max) continuation of ``prompt`` (new text only) with ``hooks`` attached: one full
    forward per new token, without a key-value cache, so the hooks see every position as in a plain forward."""
    ids = model.to_tokens(prompt)
    start = ids.shape[1]
    with attached_hooks(model, hooks), torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return model.tokenizer.decode(ids[0, start:].tolist())


class LivePruning:
    """The live tab's engine over one model. ``calibration(methods)`` returns a calibration that serves those
    methods (the app passes its kept one); nothing here runs under a lock of its own, the caller holds the model."""

    def __init__(
        self,
        model,
        calibration: Callable[[List[str]], selection.Calibration],
        window: int = LIVE_WINDOW,
        windows_per_domain: int = LIVE_WINDOWS_PER_DOMAIN,
        new_tokens: int = LIVE_NEW_TOKENS,
    ):
        self.model = model
        self.calibration = calibration
        self.window = min(window, int(model.cfg.n_ctx))
        self.windows_per_domain = windows_per_domain
        self.new_tokens = new_tokens
        self._sets: Optional[List[evaluation.DomainWindows]] = None
        self._dense: Optional[Dict[str, float]] = None
        self._dense_text: Dict[str, str] = {}
        self._specs: Dict[Tuple[str, str, str, float], Optional[PruneSpec]] = {}

    def sets(self) -> List[evaluation.DomainWindows]:
        """The fixed subset: the first windows of each default evaluation domain (computed once)."""
        if self._sets is None:
            self._sets = evaluation.domain_windows(
                self.model, pipelines.evaluation_sets_for(), self.window, self.windows_per_domain
            )
        return self._sets

    def dense(self) -> Dict[str, float]:
        if self._dense is None:
            self._dense = evaluation.domain_perplexities(self.model, self.sets())
        return self._dense

    def check_prompt(self, prompt: str) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty; type a few words for the models to continue.")
        n = int(self.model.to_tokens(prompt).shape[1])
        if n > MAX_PROMPT_TOKENS:
            raise ValueError(f"the prompt has {n} tokens; at most {MAX_PROMPT_TOKENS} in the live tab.")
        return prompt

    def spec(self, method: str, scope: str, ablation: str, sparsity: float) -> Optional[PruneSpec]:
        """The selection's spec (kept). The first one of a (method, scope, ablation) is made at
        :data:`LIVE_MAX_SPARSITY` first: a method with a greedy order (``obs``) then keeps the whole order in the
        calibration, and every later slider position reads a prefix of it instead of growing it."""
        key = (method, scope, ablation, sparsity)
        if key not in self._specs:
            cal = self.calibration([method])
            deepest = (method, scope, ablation, LIVE_MAX_SPARSITY)
            if deepest not in self._specs:
                self._specs[deepest] = selection.build_spec(self.model, cal, method, LIVE_MAX_SPARSITY, scope, ablation)
            if key not in self._specs:
                self._specs[key] = selection.build_spec(self.model, cal, method, sparsity, scope, ablation)
        return self._specs[key]

    def warm(self, method: str, prompt: str = DEFAULT_PROMPT, scope: str = "per_layer", ablation: str = "zero") -> None:
        """Compute everything a first slider move would wait for: calibration, windows, dense numbers and text, and
        the method's deepest selection (:meth:`spec`)."""
        self.calibration([method])
        self.dense()
        self.dense_text(prompt)
        self.spec(method, scope, ablation, LIVE_MAX_SPARSITY)

    def dense_text(self, prompt: str) -> str:
        if prompt not in self._dense_text:
            self._dense_text[prompt] = greedy_continuation(self.model, prompt, self.new_tokens)
        return self._dense_text[prompt]

    def run(
        self, method: str, scope: str, sparsity: float, ablation: Optional[str] = None, prompt: str = DEFAULT_PROMPT
    ) -> LiveResult:
        """Simulate the pruning and measure it on the subset; continue the prompt dense and pruned."""
        scores.check_method(method)
        if scores.is_random(method):
            raise ValueError(f"{method!r} is a random baseline; choose a ranking method for the live tab.")
        selection.check_scope(scope)
        sparsity = selection.check_sparsity(sparsity)
        ablation = check_ablation(ablation or "zero")
        prompt = self.check_prompt(prompt)
        t0 = time.perf_counter()
        spec = self.spec(method, scope, ablation, sparsity)
        t1 = time.perf_counter()
        hooks = simulation_hooks(spec) if spec is not None else []
        dense = self.dense()
        pruned = evaluation.domain_perplexities(self.model, self.sets(), hooks) if hooks else dict(dense)
        t2 = time.perf_counter()
        dense_text = self.dense_text(prompt)
        pruned_text = greedy_continuation(self.model, prompt, self.new_tokens, hooks) if hooks else dense_text
        t3 = time.perf_counter()
        rows = [
            {
                "domain": d.name,
                "in_domain": bool(d.in_domain),
                "tokens": d.wins.n_scored,
                "dense": dense[d.name],
                "pruned": pruned[d.name],
                "x_dense": pruned[d.name] / dense[d.name],
            }
            for d in self.sets()
        ]
        table = pd.DataFrame(rows)
        return LiveResult(
            method=method,
            ablation=ablation,
            scope=scope,
            sparsity=sparsity,
            n_pruned=spec.n_pruned if spec else 0,
            table=table,
            geometric_mean=evaluation.geometric_mean(table["x_dense"]),
            prompt=prompt,
            dense_text=dense_text,
            pruned_text=pruned_text,
            timings={"select_s": t1 - t0, "perplexity_s": t2 - t1, "generate_s": t3 - t2, "total_s": t3 - t0},
        )


def describe(result: LiveResult) -> str:
    """One line: what was pruned and its geometric-mean cost."""
    return (
        f"{result.n_pruned:,} neurons pruned ({result.method}, {result.ablation} ablation, {result.scope}, "
        f"sparsity {result.sparsity:g}): perplexity x{result.geometric_mean:.4g} of dense (geometric mean over "
        f"{len(result.table)} domains, {int(result.table['tokens'].sum())} tokens), in {result.timings['total_s']:.2f} s."
    )
