"""Score every MLP neuron in one streaming pass, and validate the cheap scores against exact ablation.

One forward and one backward pass per batch give, for every neuron of every layer (``blocks.{l}.mlp.hook_post``):

* weight norms: ``w_in_norm`` (the input-side row of W_in / up_proj / c_fc) and ``w_out_norm`` (the neuron's
  output row of W_out / down_proj / c_proj);
* activation statistics over real tokens: mean, mean_abs, var (population), rms, frac_active, max;
* ``wanda`` = w_out_norm x rms: the structured (per-neuron) form of Wanda's |W| x ||X|| (Sun et al. 2023);
* ``fluctuation`` = var x w_out_norm^2: FLAP's fluctuation metric (An et al. 2024);
* ``taylor_zero`` / ``taylor_mean``: the first-order Taylor estimate of the loss change when the neuron is replaced
  by 0 / by its mean (gradient x activation, Molchanov et al. 2019). With ``L`` the mean next-token cross-entropy
  over the N positions that have a real next token (the core's loss definition), ``g_t = dL_sum/da_t`` the
  gradient of the summed loss w.r.t. the activation at real position t, and mu the neuron's mean activation:

      taylor_zero = sum_t g_t * (0 - a_t) / N
      taylor_mean = sum_t g_t * (mu - a_t) / N = (mu * sum_t g_t - sum_t g_t a_t) / N

  Signed, so it estimates ``loss_change`` of :func:`neuronscope_tl.impact.simulate_pruning` directly. The sums
  run over every real position (the last position's gradient is 0: it predicts no real token).

Gradients are taken w.r.t. the hook activations only, with :func:`torch.autograd.grad`; the parameters are set
to ``requires_grad=False`` for the pass (restored by :func:`attached_hooks`) and never get a ``.grad``. All
statistics are running sums (Chan's update for the variance) in :class:`ScoreAccumulator`, which merges across
shards of texts. The top-k activating token positions per neuron are kept as (text, position, value) only, and
their text is decoded at the end by :func:`top_contexts`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .activations import DEFAULT_ACTIVE_THRESHOLD, NeuronAccumulator
from .hooks import attached_hooks, mlp_post_name
from .impact import check_batch_size
from .metrics import log_probs, nll_from_log_probs
from .models import mlp_info
from .texts import DEFAULT_BATCH_SIZE, batches, tokenize
from .weights import neuron_weight_table

SCORE_COLUMNS = (
    "layer", "neuron", "label", "w_in_norm", "w_out_norm", "mean", "mean_abs", "var", "rms", "frac_active", "max",
    "wanda", "fluctuation", "taylor_zero", "taylor_mean",
)
# The cheap scores validate_scores compares with the exact loss change (low = prune first).
CHEAP_SCORES = ("w_out_norm", "mean_abs", "rms", "wanda", "fluctuation", "taylor_zero", "taylor_mean")
DEFAULT_TOP_K = 8
DEFAULT_CONTEXT = 4  # tokens shown either side of a top-activating token


class ScoreAccumulator:
    """Mergeable per-neuron state of the scoring pass for all layers.

    Holds a :class:`NeuronAccumulator` (activation statistics), float64 sums of the gradient and of gradient x
    activation, the number of loss terms, and per neuron the top-k activations with their (text, position).
    """

    def __init__(self, n_layers: int, d_mlp: int, top_k: int = DEFAULT_TOP_K, active_threshold: float = DEFAULT_ACTIVE_THRESHOLD):
        self.layers = list(range(n_layers))
        self.d_mlp, self.top_k = d_mlp, top_k
        self.stats = NeuronAccumulator(self.layers, d_mlp, active_threshold)
        self.sum_grad = torch.zeros((n_layers, d_mlp), dtype=torch.float64)
        self.sum_grad_act = torch.zeros((n_layers, d_mlp), dtype=torch.float64)
        self.n_targets = 0
        self.n_texts = 0
        shape = (n_layers, top_k, d_mlp)
        self.top_value = torch.full(shape, -torch.inf)
        self.top_text = torch.full(shape, -1, dtype=torch.long)
        self.top_pos = torch.full(shape, -1, dtype=torch.long)

    def update(self, layer: int, acts: Tensor, grads: Tensor, text: Tensor, pos: Tensor) -> None:
        """Real-token activations and gradients of one layer, [n, d_mlp], with each row's text and position [n]."""
        self.stats.update(layer, acts)
        a, g = acts.detach().double(), grads.detach().double()
        self.sum_grad[layer] += g.sum(0)
        self.sum_grad_act[layer] += (g * a).sum(0)
        k = min(self.top_k, acts.shape[0])
        val, idx = acts.detach().float().topk(k, dim=0)  # [k, d_mlp]
        self._keep_top(layer, val, text[idx], pos[idx])

    def _keep_top(self, layer: int, val: Tensor, text: Tensor, pos: Tensor) -> None:
        val = torch.cat([self.top_value[layer], val])
        text = torch.cat([self.top_text[layer], text])
        pos = torch.cat([self.top_pos[layer], pos])
        best, idx = val.topk(self.top_k, dim=0)
        self.top_value[layer], self.top_text[layer], self.top_pos[layer] = best, text.gather(0, idx), pos.gather(0, idx)

    def merge(self, other: "ScoreAccumulator") -> "ScoreAccumulator":
        """Fold in a shard computed on later texts: its text indices are shifted by this shard's text count."""
        if (other.layers, other.d_mlp, other.top_k) != (self.layers, self.d_mlp, self.top_k):
            raise ValueError("can only merge score accumulators over the same layers, d_mlp and top_k.")
        self.stats.merge(other.stats)
        self.sum_grad += other.sum_grad
        self.sum_grad_act += other.sum_grad_act
        self.n_targets += other.n_targets
        shifted = torch.where(other.top_text >= 0, other.top_text + self.n_texts, other.top_text)
        for layer in self.layers:
            self._keep_top(layer, other.top_value[layer], shifted[layer], other.top_pos[layer])
        self.n_texts += other.n_texts
        return self

    def table(self, model) -> pd.DataFrame:
        """The per-neuron score table (columns :data:`SCORE_COLUMNS`)."""
        weights = neuron_weight_table(model)
        table = self.stats.table()
        table.insert(3, "w_in_norm", weights["w_in_norm"].to_numpy())
        table.insert(4, "w_out_norm", weights["w_out_norm"].to_numpy())
        n = max(self.n_targets, 1)
        sum_ga = self.sum_grad_act.reshape(-1).numpy()
        table["wanda"] = table["w_out_norm"] * table["rms"]
        table["fluctuation"] = table["var"] * table["w_out_norm"] ** 2
        table["taylor_zero"] = -sum_ga / n
        table["taylor_mean"] = (table["mean"].to_numpy() * self.sum_grad.reshape(-1).numpy() - sum_ga) / n
        return table[list(SCORE_COLUMNS)]


@dataclass
class ScorePass:
    """Everything one scoring pass produced: the table, the mergeable state, and the tokens for contexts."""

    table: pd.DataFrame = field(repr=False)
    accumulator: ScoreAccumulator = field(repr=False)
    token_lists: List[Tensor] = field(repr=False)
    tokenizer: object = field(repr=False)
    n_tokens: int = 0


def accumulate_scores(
    model,
    token_lists: Sequence[Tensor],
    batch_size: int = DEFAULT_BATCH_SIZE,
    top_k_contexts: int = DEFAULT_TOP_K,
    progress: bool = False,
) -> ScoreAccumulator:
    """The streaming pass: per batch, one forward with capture hooks on every ``mlp.hook_post``, one backward."""
    batch_size = check_batch_size(batch_size)
    if not isinstance(top_k_contexts, int) or top_k_contexts < 1:
        raise ValueError(f"top_k_contexts must be an integer >= 1, got {top_k_contexts!r}.")
    info = mlp_info(model)
    acc = ScoreAccumulator(info.n_layers, info.d_mlp, top_k_contexts)
    acc.n_texts = len(token_lists)
    captured: Dict[int, Tensor] = {}

    def capture(layer):
        def hook(act, hook=None):
            if not act.requires_grad:  # nothing upstream needs a gradient: make this activation the leaf
                act = act.detach().requires_grad_(True)
            captured[layer] = act
            return act

        return hook

    hooks = [(mlp_post_name(l), capture(l)) for l in acc.layers]
    with attached_hooks(model, hooks), torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)  # attached_hooks restores the flags
        for batch in tqdm(list(batches(model, token_lists, batch_size)), desc="scores", disable=not progress):
            captured.clear()
            logits = model(batch.tokens)
            tmask = batch.target_mask()
            loss = nll_from_log_probs(log_probs(logits), batch.tokens)[tmask].sum()
            del logits
            grads = torch.autograd.grad(loss, [captured[l] for l in acc.layers])
            acc.n_targets += int(tmask.sum())
            rows, pos = batch.mask.nonzero(as_tuple=True)
            text = torch.as_tensor(batch.text_index)[rows]
            for layer, g in zip(acc.layers, grads):
                a = captured[layer].detach()
                acc.update(layer, a[batch.mask], g[batch.mask], text, pos)
            captured.clear()
    return acc


def score_pass(
    model,
    texts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: Optional[int] = None,
    top_k_contexts: int = DEFAULT_TOP_K,
    progress: bool = False,
) -> ScorePass:
    """Score every neuron over ``texts`` (first ``max_tokens`` tokens) and keep the top contexts."""
    check_batch_size(batch_size)
    token_lists = tokenize(model, texts, max_tokens=max_tokens)
    acc = accumulate_scores(model, token_lists, batch_size, top_k_contexts, progress)
    return ScorePass(acc.table(model), acc, token_lists, model.tokenizer, sum(int(t.numel()) for t in token_lists))


def score_neurons(
    model,
    texts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: Optional[int] = None,
    top_k_contexts: int = DEFAULT_TOP_K,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per (layer, neuron) of every layer with the columns :data:`SCORE_COLUMNS` (see module docstring)."""
    return score_pass(model, texts, batch_size, max_tokens, top_k_contexts, progress).table


def top_contexts(result: ScorePass, layer: int, neuron: int, window: int = DEFAULT_CONTEXT) -> pd.DataFrame:
    """The neuron's top-k activating tokens, highest first: activation, text index, position, token, context."""
    acc = result.accumulator
    if not (0 <= layer < len(acc.layers) and 0 <= neuron < acc.d_mlp):
        raise ValueError(f"(layer, neuron) = ({layer}, {neuron}) is out of range; layers 0..{len(acc.layers) - 1}, neurons 0..{acc.d_mlp - 1}.")
    rows = []
    for value, t, p in zip(acc.top_value[layer, :, neuron].tolist(), acc.top_text[layer, :, neuron].tolist(), acc.top_pos[layer, :, neuron].tolist()):
        if t < 0:
            continue
        ids = result.token_lists[t]
        decode = lambda s: result.tokenizer.decode([int(i) for i in s])
        rows.append({
            "activation": value, "text_index": t, "position": p, "token": decode(ids[p : p + 1]),
            "left": decode(ids[max(0, p - window) : p]), "right": decode(ids[p + 1 : p + 1 + window]),
        })
    return pd.DataFrame(rows, columns=["activation", "text_index", "position", "token", "left", "right"])
