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

from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .arch import Tail, arch_for
from .engine import model_device
from .hooks import attached_hooks, capture_hook, mlp_post_name
from .impact import ablation_values, check_ablation, check_candidates
from .metrics import kl_from_log_probs, log_probs, nll_from_log_probs
from .models import mlp_info
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
        at = (rows.to(act.device), slice(None), index.to(act.device))
        act[at] = 0.0 if values is None else values.to(device=act.device, dtype=act.dtype)[:, None]
        return act

    return hook


def stacks_and_costs(pairs: Sequence, stack: int, n_layers: int) -> Tuple[List[Tuple[int, List[int]]], List[int]]:
    """The tail runs of :func:`ablate_each`: per layer (ascending), the positions in ``pairs`` of its neurons in
    stacks of at most ``stack``, each with its cost (ablations x blocks in the tail). Under torchrun each rank
    runs whole stacks, so every ablation is computed in the same stack as in one process."""
    by_layer: Dict[int, List[int]] = {}
    for i, (layer, _) in enumerate(pairs):
        by_layer.setdefault(layer, []).append(i)
    stacks = [(layer, rows[s : s + stack]) for layer, rows in sorted(by_layer.items()) for s in range(0, len(rows), stack)]
    return stacks, [len(rows) * (n_layers - layer) for layer, rows in stacks]


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

    Under torchrun the stacks are shared between the ranks (:func:`stacks_and_costs`) and the measured rows
    gathered: every rank returns the whole table, in the given order.

    Returns columns layer, neuron, label, loss_change, kl, loss_original, loss_pruned.
    """
    check_ablation(ablation)
    pairs = check_candidates(model, neurons)
    stack = check_int(stack, "stack", 1)
    token_lists = tokenize(model, texts, max_tokens=max_tokens)
    layers = sorted({l for l, _ in pairs})
    values = ablation_values(model, layers, ablation, calib_texts)
    tail = model_tail(model)
    mine = distributed.shard(*stacks_and_costs(pairs, stack, mlp_info(model).n_layers))
    device = model_device(model)
    measured = torch.zeros(2, len(pairs), dtype=torch.float64)  # summed NLL and KL of each ablation, over all texts
    nll_orig, n_targets, n_positions = 0.0, 0, 0
    bar = tqdm(total=len(token_lists) * sum(len(c) for _, c in mine), desc="ablate", disable=not progress)
    with distributed.shard_work("ablate"), torch.no_grad():
        for ids in token_lists:
            tokens = ids[None].to(device)
            resid: dict = {}
            captures = [(f"blocks.{l}.hook_resid_pre", capture_hook(resid, str(l))) for l in sorted({l for l, _ in mine})]
            with attached_hooks(model, captures):
                logp_orig = log_probs(model(tokens))[0]  # [pos, vocab]
            nll_orig += float(nll_from_log_probs(logp_orig[None], tokens).double().sum())
            n_targets += tokens.shape[1] - 1
            n_positions += tokens.shape[1]
            for layer, chunk in mine:
                idx = [pairs[i][1] for i in chunk]
                vals = None if values[layer] is None else values[layer][torch.tensor(idx)]
                hook = stacked_ablation_hook(idx, vals)
                with attached_hooks(model, [(mlp_post_name(layer), hook)]):
                    hidden = run_body(tail, resid[str(layer)].expand(len(chunk), -1, -1), layer)
                for row, i in enumerate(chunk):
                    logp = log_probs(tail.head(tail.norm(hidden[row : row + 1])))
                    measured[0, i] += float(nll_from_log_probs(logp, tokens).double().sum())
                    measured[1, i] += float(kl_from_log_probs(logp_orig, logp[0]).double().sum())
                bar.update(len(chunk))
    bar.close()
    nll_pruned, kl_sum = distributed.sum_disjoint(measured)
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
