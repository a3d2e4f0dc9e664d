"""The streaming engine: run a model over token batches and feed every ``blocks.{l}.mlp.hook_post`` activation to
pluggable accumulators.

An accumulator is any object with

* ``layers``: the layers whose activations it reads;
* ``needs_grad``: whether it also needs ``dL/da``, the gradient of the summed next-token cross-entropy over the
  batch's real targets with respect to each activation;
* ``observe(obs)``: called once per layer and batch with an :class:`Observation` (real tokens only);
* optionally ``end_batch(batch)``: called after each batch.

Activation statistics (:class:`~neuronscope_tl.activations.NeuronAccumulator`), Gram matrices
(:class:`~neuronscope_tl.activations.GramAccumulator`) and scores with gradients and top contexts
(:class:`~neuronscope_tl.scoring.ScoreAccumulator`) all plug in here, and several of them share one pass.

Without gradients the activations are consumed inside the hooks as the forward goes (no activation of the whole
model is ever held) and the forward stops after the last layer anyone reads (``stop_at_layer``). With gradients,
the parameters are frozen for the pass (:func:`~neuronscope_tl.hooks.attached_hooks` restores them and no
``.grad`` is created), the activations become the leaves of :func:`torch.autograd.grad`, and one backward per
batch serves every accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .hooks import attached_hooks, mlp_post_name
from .metrics import log_probs, nll_from_log_probs
from .models import mlp_info
from .texts import DEFAULT_BATCH_SIZE, TokenBatch, batches


@dataclass
class Observation:
    """One layer's activations on the real tokens of one batch.

    Attributes:
        layer: the block index.
        acts: activations, detached.
        grads: ``dL/da`` (``L`` = summed next-token cross-entropy of the batch), or None without gradients.
        text: the index of each row's text in the token list given to :func:`run`.
        pos: each row's position in its text.
    """

    layer: int
    acts: Float[Tensor, "n_tokens d_mlp"]
    grads: Optional[Float[Tensor, "n_tokens d_mlp"]]
    text: Int[Tensor, " n_tokens"]
    pos: Int[Tensor, " n_tokens"]


class Accumulator(Protocol):
    layers: Sequence[int]
    needs_grad: bool

    def observe(self, obs: Observation) -> None: ...


def _rows(batch: TokenBatch):
    rows, pos = batch.mask.nonzero(as_tuple=True)
    return torch.as_tensor(batch.text_index)[rows], pos


def run(
    model,
    token_lists: Sequence[Tensor],
    accumulators: Sequence[Accumulator],
    batch_size: int = DEFAULT_BATCH_SIZE,
    by_length: bool = True,
    progress: bool = False,
    desc: str = "stream",
) -> None:
    """Stream ``token_lists`` through ``model`` in right-padded batches and feed every accumulator.

    ``by_length`` batches texts of similar length together, longest first (less padding); ``False`` keeps the
    given order (accumulators whose floating-point sums depend on order then see the texts as listed).
    """
    layers = sorted({int(l) for acc in accumulators for l in acc.layers})
    if not layers:
        return
    readers: Dict[int, List[Accumulator]] = {l: [a for a in accumulators if l in a.layers] for l in layers}
    with_grad = any(acc.needs_grad for acc in accumulators)
    n_layers = mlp_info(model).n_layers
    captured: Dict[int, Tensor] = {}
    current: dict = {}

    def hook_for(layer: int):
        def hook(act: Tensor, hook=None):
            if with_grad:
                if not act.requires_grad:  # nothing upstream needs a gradient: this activation is the leaf
                    act = act.detach().requires_grad_(True)
                captured[layer] = act
                return act
            obs = Observation(layer, act.detach()[current["mask"]], None, *current["rows"])
            for acc in readers[layer]:
                acc.observe(obs)
            return None

        return hook

    hooks = [(mlp_post_name(l), hook_for(l)) for l in layers]
    batch_list = list(batches(model, token_lists, batch_size, by_length=by_length))
    with attached_hooks(model, hooks), torch.set_grad_enabled(with_grad):
        if with_grad:
            for p in model.parameters():
                p.requires_grad_(False)  # attached_hooks restores the flags
        for batch in tqdm(batch_list, desc=desc, disable=not progress):
            current["mask"], current["rows"] = batch.mask, _rows(batch)
            if with_grad:
                captured.clear()
                logits = model(batch.tokens)
                loss = nll_from_log_probs(log_probs(logits), batch.tokens)[batch.target_mask()].sum()
                del logits
                grads = torch.autograd.grad(loss, [captured[l] for l in layers])
                for layer, g in zip(layers, grads):
                    obs = Observation(layer, captured[layer].detach()[batch.mask], g[batch.mask], *current["rows"])
                    for acc in readers[layer]:
                        acc.observe(obs)
                captured.clear()
            elif layers[-1] + 1 < n_layers:
                model(batch.tokens, stop_at_layer=layers[-1] + 1)
            else:
                model(batch.tokens, return_type=None)
            for acc in accumulators:
                end = getattr(acc, "end_batch", None)
                if end is not None:
                    end(batch)
