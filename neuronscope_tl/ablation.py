"""Exact ablation of many single neurons, running only the model's tail from each neuron's layer.

For each text, one clean forward records the residual stream entering every needed block
(``blocks.{k}.hook_resid_pre``) and the clean log-probabilities. Then, for a neuron of layer k, only the decoder
layers k..L-1, the final norm and the unembedding are run, starting from that cached residual. TransformerLens
4.3's ``start_at_layer`` cannot be used for this: it still runs blocks 0..k-1 and only swaps the residual in at
block k, so it costs a full forward.

The tail comes from the model kind's adapter (:mod:`neuronscope_tl.arch`). For a bridge it is the HF model's own
decoder layers (wrapped in place by the bridge, so the bridge's hook points still fire), called as the HF model
calls them: Llama-style layers get the model's rotary position embeddings and causal mask, Gemma 3 layers the mask
and rotary table of their attention type, GPT-2-style blocks the causal mask (their position embeddings are
already in the residual). For a HookedTransformer it is ``model.blocks[k:]``, ``ln_final`` and ``unembed``. Several
ablations share one tail run: the cached residual is repeated along the batch dimension and copy i has neuron i
replaced at ``blocks.{k}.mlp.hook_post`` (the input of down_proj / c_proj), the same place the core's ablation
hooks write, through :func:`attached_hooks`. The final norm, unembedding and metrics run one copy at a time so
that only one [pos, vocab] logit tensor is alive at once.

Definitions are those of :func:`neuronscope_tl.impact.simulate_pruning`: ``loss_change`` is the mean next-token
cross-entropy over all positions with a real next token, pruned minus original; ``kl`` the mean over all real
positions of KL(P_orig || P_pruned), both pooled over all texts.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .arch import Tail, arch_for
from .hooks import attached_hooks, capture_hook, mlp_post_name
from .impact import ablation_values, check_ablation, check_candidates
from .metrics import kl_from_log_probs, log_probs, nll_from_log_probs
from .texts import check_int, tokenize

# Ablations per tail run. 8 copies of a ~256-token text make [2048, d_model] matmuls, large enough to run near the
# CPU's matmul peak while the batch of hidden states stays small.
DEFAULT_STACK = 8


def model_tail(model: torch.nn.Module) -> Tail:
    """The model's tail, from its kind's adapter; ValueError naming the supported kinds for any other model."""
    return arch_for(model).tail(model)


def run_body(tail: Tail, resid: Tensor, start: int) -> Tensor:
    """Blocks start..L-1 on ``resid`` [batch, pos, d_model] (unpadded, positions 0..pos-1)."""
    return tail.run(resid, start)


def stacked_ablation_hook(neurons: Sequence[int], values: Optional[Tensor]):
    """Copy i of the batch gets neuron ``neurons[i]`` set to 0 (``values`` None) or to ``values[i]``."""
    index = torch.as_tensor(list(neurons), dtype=torch.long)
    rows = torch.arange(len(index))

    def hook(act: Tensor, hook=None) -> Tensor:
        act = act.clone()
        act[rows, :, index] = 0.0 if values is None else values.to(act.dtype)[:, None]
        return act

    return hook


def ablate_each(
    model,
    neurons,
    texts: Sequence[str],
    ablation: str = "zero",
    calib_texts: Optional[Sequence[str]] = None,
    max_tokens: Optional[int] = None,
    stack: int = DEFAULT_STACK,
    progress: bool = False,
) -> pd.DataFrame:
    """Ablate each neuron alone and measure it exactly: one row per neuron, in the given order.

    Args:
        neurons: (layer, neuron) pairs, {layer_index, neuron_index} dicts, or a DataFrame with layer/neuron.
        texts: the texts the loss and KL are measured on (first ``max_tokens`` tokens if given).
        ablation: ``zero``, or ``mean`` (each neuron's mean over ``calib_texts``, as in ``simulate_pruning``).
        stack: ablations run together in one tail pass.

    Returns columns layer, neuron, label, loss_change, kl, loss_original, loss_pruned.
    """
    check_ablation(ablation)
    pairs = check_candidates(model, neurons)
    stack = check_int(stack, "stack", 1)
    token_lists = tokenize(model, texts, max_tokens=max_tokens)
    layers = sorted({l for l, _ in pairs})
    values = ablation_values(model, layers, ablation, calib_texts)
    by_layer: Dict[int, List[int]] = {}
    for i, (layer, _) in enumerate(pairs):
        by_layer.setdefault(layer, []).append(i)
    tail = model_tail(model)
    nll_pruned = torch.zeros(len(pairs), dtype=torch.float64)
    kl_sum = torch.zeros(len(pairs), dtype=torch.float64)
    nll_orig, n_targets, n_positions = 0.0, 0, 0
    bar = tqdm(total=len(token_lists) * len(pairs), desc="ablate", disable=not progress)
    with torch.no_grad():
        for ids in token_lists:
            tokens = ids[None]
            resid: dict = {}
            with attached_hooks(model, [(f"blocks.{l}.hook_resid_pre", capture_hook(resid, str(l))) for l in layers]):
                logp_orig = log_probs(model(tokens))[0]  # [pos, vocab]
            nll_orig += float(nll_from_log_probs(logp_orig[None], tokens).double().sum())
            n_targets += tokens.shape[1] - 1
            n_positions += tokens.shape[1]
            for layer in layers:
                for start in range(0, len(by_layer[layer]), stack):
                    chunk = by_layer[layer][start : start + stack]
                    idx = [pairs[i][1] for i in chunk]
                    vals = None if values[layer] is None else values[layer][torch.tensor(idx)]
                    hook = stacked_ablation_hook(idx, vals)
                    with attached_hooks(model, [(mlp_post_name(layer), hook)]):
                        hidden = run_body(tail, resid[str(layer)].expand(len(chunk), -1, -1), layer)
                    for row, i in enumerate(chunk):
                        logp = log_probs(tail.head(tail.norm(hidden[row : row + 1])))
                        nll_pruned[i] += nll_from_log_probs(logp, tokens).double().sum()
                        kl_sum[i] += kl_from_log_probs(logp_orig, logp[0]).double().sum()
                    bar.update(len(chunk))
    bar.close()
    loss_orig = nll_orig / n_targets
    loss_pruned = (nll_pruned / n_targets).numpy()
    return pd.DataFrame(
        {
            "layer": [l for l, _ in pairs],
            "neuron": [n for _, n in pairs],
            "label": [f"L{l}N{n}" for l, n in pairs],
            "loss_change": loss_pruned - loss_orig,
            "kl": (kl_sum / n_positions).numpy(),
            "loss_original": loss_orig,
            "loss_pruned": loss_pruned,
        }
    )
