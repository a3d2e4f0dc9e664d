"""The streaming engine: run a model over token batches and feed every ``blocks.{l}.mlp.hook_post`` activation to
pluggable accumulators.

An accumulator is any object with

* ``layers``: the layers whose activations it reads;
* ``needs_grad``: whether it also needs ``dL/da``, the gradient of the summed next-token cross-entropy over the
  batch's real targets with respect to each activation;
* ``observe(obs)``: called once per layer and batch with an :class:`Observation` (real tokens only);
* optionally ``end_batch(batch)``: called after each batch;
* ``merge(other)``, or ``merge_shard(other)`` when merging the same pass over other batches of the same token list
  differs from ``merge`` (text indices): folds in another rank's state under ``torchrun``; or ``summed = True``
  for a state that is only a ``sums`` dict of tensors and an integer ``count``, too large to gather (Gram
  matrices): summed across the ranks by ``all_reduce``.

Activation statistics (:class:`~neuronscope_tl.activations.NeuronAccumulator`), Gram matrices
(:class:`~neuronscope_tl.activations.GramAccumulator`) and scores with gradients and top contexts
(:class:`~neuronscope_tl.scoring.ScoreAccumulator`) all plug in here, and several of them share one pass.

Without gradients the activations are consumed inside the hooks as the forward goes (no activation of the whole
model is ever held) and the forward stops after the last layer anyone reads (``stop_at_layer``). With gradients,
the parameters are frozen for the pass (:func:`~neuronscope_tl.hooks.attached_hooks` restores them and no
``.grad`` is created), the activations become the leaves of :func:`torch.autograd.grad`, and one backward per
batch serves every accumulator.

Under ``torchrun`` the pass is data-parallel (:mod:`neuronscope_tl.distributed`): the batches are built as one
process builds them, each rank runs its deterministic share, and at the end every accumulator is folded across the
ranks (``merge_shard`` when it has one, else ``merge``; Gram sums by ``all_reduce``), so that on every rank it
holds the whole stream's result. Text indices always refer to the token list given to :func:`run`. Batches run on
the model's device; accumulators receive activations on that device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Protocol, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
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


def model_device(model) -> torch.device:
    """The device of the model's parameters (CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def on_device(batch: TokenBatch, device: torch.device) -> TokenBatch:
    """The batch with its tokens and mask on ``device``."""
    return replace(batch, tokens=batch.tokens.to(device), mask=batch.mask.to(device))


@dataclass
class _Pass:
    """One streaming pass: which accumulators read which layer, and the hooks that feed them."""

    model: object
    accumulators: Sequence[Accumulator]
    layers: List[int]
    device: torch.device

    def __post_init__(self):
        self.readers: Dict[int, List[Accumulator]] = {l: [a for a in self.accumulators if l in a.layers] for l in self.layers}
        self.with_grad = any(acc.needs_grad for acc in self.accumulators)
        self.n_layers = mlp_info(self.model).n_layers
        self.captured: Dict[int, Tensor] = {}
        self.mask: Optional[Tensor] = None
        self.rows: tuple = ()

    def feed(self, obs: Observation) -> None:
        for acc in self.readers[obs.layer]:
            acc.observe(obs)

    def hook_for(self, layer: int):
        def hook(act: Tensor, hook=None):
            if self.with_grad:
                if not act.requires_grad:  # nothing upstream needs a gradient: this activation is the leaf
                    act = act.detach().requires_grad_(True)
                self.captured[layer] = act
                return act
            self.feed(Observation(layer, act.detach()[self.mask], None, *self.rows))
            return None

        return hook

    def run_batch(self, cpu_batch: TokenBatch) -> None:
        self.rows = _rows(cpu_batch)
        batch = on_device(cpu_batch, self.device)
        self.mask = batch.mask
        if self.with_grad:
            self.captured.clear()
            logits = self.model(batch.tokens)
            loss = nll_from_log_probs(log_probs(logits), batch.tokens)[batch.target_mask()].sum()
            del logits
            grads = torch.autograd.grad(loss, [self.captured[l] for l in self.layers])
            for layer, g in zip(self.layers, grads):
                self.feed(Observation(layer, self.captured[layer].detach()[batch.mask], g[batch.mask], *self.rows))
            self.captured.clear()
        elif self.layers[-1] + 1 < self.n_layers:
            self.model(batch.tokens, stop_at_layer=self.layers[-1] + 1)
        else:
            self.model(batch.tokens, return_type=None)
        for acc in self.accumulators:
            end = getattr(acc, "end_batch", None)
            if end is not None:
                end(batch)

    def stream(self, batch_list: Sequence[TokenBatch], progress: bool, desc: str) -> None:
        hooks = [(mlp_post_name(l), self.hook_for(l)) for l in self.layers]
        with attached_hooks(self.model, hooks), torch.set_grad_enabled(self.with_grad):
            if self.with_grad:
                for p in self.model.parameters():
                    p.requires_grad_(False)  # attached_hooks restores the flags
            for batch in tqdm(batch_list, desc=desc, disable=not progress):
                self.run_batch(batch)


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
    given order (accumulators whose floating-point sums depend on order then see the texts as listed). Under
    torchrun each rank streams its share of the batches and the accumulators are then folded across the ranks.
    """
    layers = sorted({int(l) for acc in accumulators for l in acc.layers})
    if not layers:
        return
    device = model_device(model)
    batch_list = list(batches(model, token_lists, batch_size, by_length=by_length))
    mine = distributed.shard(batch_list, [b.tokens.numel() for b in batch_list])
    with distributed.shard_work(desc):
        _Pass(model, accumulators, layers, device).stream(mine, progress, desc)
    distributed.reduce(accumulators, device)
