"""The streaming engine: the one place that runs a model over token batches. Each batch runs under one or more hook
sets, and every ``blocks.{l}.mlp.hook_post`` activation, captured hook value and output goes to pluggable
accumulators.

An accumulator is any object with

* ``layers``: the layers whose activations it reads (``()`` for none), and ``observe(obs)``: called once per layer,
  batch and variant with an :class:`Observation` (real tokens only);
* ``needs_grad``: whether it also needs ``dL/da``, the gradient of the summed next-token cross-entropy over the
  batch's real targets with respect to each activation;
* optionally ``output(out)``: called after each forward with an :class:`Output`: the model's next-token
  log-probabilities and the hook values it asked for. Having it makes the forwards run to the logits;
* optionally, with ``output``, ``captures``: hook names whose values (detached, as the forward left them) it reads
  in ``out.captured``;
* optionally ``end_batch(batch)``: called after each batch;
* ``merge(other)``, or ``merge_shard(other)`` when merging the same pass over other batches of the same token list
  differs from ``merge`` (text indices): folds in another rank's state under ``torchrun``; or ``summed = True``
  for a state that is only a ``sums`` dict of tensors and an integer ``count``, too large to gather (Gram
  matrices): summed across the ranks by ``all_reduce``.

Activation statistics (:class:`~neuronscope_tl.activations.NeuronAccumulator`), Gram matrices
(:class:`~neuronscope_tl.activations.GramAccumulator`) and scores with gradients and top contexts
(:class:`~neuronscope_tl.scoring.ScoreAccumulator`) read activations; perplexity
(:func:`~neuronscope_tl.evaluation.window_nll`) and simulated pruning (:func:`~neuronscope_tl.impact.measure_plans`)
read outputs. Several accumulators share one pass.

**Variants.** :func:`run` takes ``variants``: the hook sets (:data:`~neuronscope_tl.hooks.HookSpec` lists) each
batch is run under, in order, one forward each; by default one empty set, the model as it is. Perplexity under a
pruning passes one set (the pruning's hooks); simulated pruning passes the clean model first, then each ablation
plan's hooks, and compares every plan's output with the clean output of the same batch, so nothing of a batch is
kept beyond it. :attr:`Output.variant` and :attr:`Observation.variant` say which set a forward ran under. A
variant's hooks are attached before the engine's own, so readers see the activations as those hooks leave them.
Every hook is attached through :func:`~neuronscope_tl.hooks.attached_hooks`: one hook set stays attached for the
whole pass, several are swapped around each forward.

**Forwards.** Without gradients or outputs, the activations are consumed inside the hooks as the forward goes (no
activation of the whole model is ever held) and the forward stops after the last layer anyone reads
(``stop_at_layer``). With an output reader the forward runs to the logits, which become fp32 log-probabilities
(:func:`~neuronscope_tl.metrics.log_probs`) once for every reader; the logits themselves are not kept. With
gradients, the parameters are frozen for the pass (:func:`~neuronscope_tl.hooks.attached_hooks` restores them and
no ``.grad`` is created), the activations become the leaves of :func:`torch.autograd.grad`, and one backward per
forward serves every accumulator. ``bf16=True`` runs the pass, accumulators included, under
``torch.autocast(device, torch.bfloat16)`` (weights stay fp32); without it the pass keeps the precision its caller
set (a caller may wrap :func:`run` in its own autocast).

**Ranks.** Under ``torchrun`` the pass is data-parallel (:mod:`neuronscope_tl.distributed`): the batches are built
as one process builds them, each rank runs its deterministic share, and at the end every accumulator is folded
across the ranks (``merge_shard`` when it has one, else ``merge``; Gram sums by ``all_reduce``), so that on every
rank it holds the whole stream's result. ``shard=False`` runs every batch on every rank instead, with no collective:
each rank computes the whole result by itself (for accumulators that cannot be merged). Text indices always refer
to the token list given to :func:`run`. Batches run on the model's device; accumulators receive tensors on that
device.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Protocol, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .hooks import HookSpec, attached_hooks, capture_hook, mlp_post_name
from .metrics import log_probs, nll_from_log_probs
from .models import mlp_info
from .texts import DEFAULT_BATCH_SIZE, TokenBatch, batches

CLEAN = ((),)  # the default variants: one forward per batch, without hooks


@dataclass
class Observation:
    """One layer's activations on the real tokens of one batch.

    Attributes:
        layer: the block index.
        acts: activations, detached.
        grads: ``dL/da`` (``L`` = summed next-token cross-entropy of the batch), or None without gradients.
        text: the index of each row's text in the token list given to :func:`run`.
        pos: each row's position in its text.
        variant: the index of the hook set the forward ran under.
    """

    layer: int
    acts: Float[Tensor, "n_tokens d_mlp"]
    grads: Optional[Float[Tensor, "n_tokens d_mlp"]]
    text: Int[Tensor, " n_tokens"]
    pos: Int[Tensor, " n_tokens"]
    variant: int = 0


@dataclass
class Output:
    """The model's output on one batch under one hook set.

    Attributes:
        variant: the index of the hook set in ``variants``.
        batch: the batch, its tokens and mask on the model's device (``mask`` marks the real tokens).
        logp: next-token log-probabilities in fp32 at every position, padding included, detached.
        captured: ``{hook name: value}`` of every name some accumulator ``captures``, detached.
    """

    variant: int
    batch: TokenBatch
    logp: Float[Tensor, "batch pos vocab"]
    captured: Dict[str, Tensor]


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
    """One streaming pass: which accumulators read which layer and output, and the hooks that feed them."""

    model: object
    accumulators: Sequence[Accumulator]
    variants: Sequence[Sequence[HookSpec]]
    device: torch.device
    bf16: bool

    def __post_init__(self):
        self.layers = sorted({int(l) for acc in self.accumulators for l in acc.layers})
        self.readers: Dict[int, List[Accumulator]] = {l: [a for a in self.accumulators if l in a.layers] for l in self.layers}
        self.outputs = [acc for acc in self.accumulators if hasattr(acc, "output")]
        names = [name for acc in self.outputs for name in getattr(acc, "captures", ())]
        self.captures = list(dict.fromkeys(names))
        self.with_grad = bool(self.layers) and any(acc.needs_grad for acc in self.accumulators)
        self.n_layers = mlp_info(self.model).n_layers
        self.leaves: Dict[int, Tensor] = {}
        self.captured: Dict[str, Tensor] = {}
        self.mask: Optional[Tensor] = None
        self.rows: tuple = ()
        self.variant = 0
        # Several hook sets are each attached around their forwards; a single one stays attached for the pass.
        self.swap = len(self.variants) > 1

    @property
    def idle(self) -> bool:
        """Whether no accumulator reads anything (then no forward is needed)."""
        return not self.layers and not self.outputs

    def feed(self, obs: Observation) -> None:
        for acc in self.readers[obs.layer]:
            acc.observe(obs)

    def hook_for(self, layer: int):
        def hook(act: Tensor, hook=None):
            if self.with_grad:
                if not act.requires_grad:  # nothing upstream needs a gradient: this activation is the leaf
                    act = act.detach().requires_grad_(True)
                self.leaves[layer] = act
                return act
            self.feed(Observation(layer, act.detach()[self.mask], None, *self.rows, self.variant))
            return None

        return hook

    def hook_set(self, variant: int) -> List[HookSpec]:
        """The variant's hooks, then the readers' and the captures' (which so see what the variant's hooks left)."""
        readers = [(mlp_post_name(l), self.hook_for(l)) for l in self.layers]
        captures = [(name, capture_hook(self.captured, name)) for name in self.captures]
        return [*self.variants[variant], *readers, *captures]

    def forward(self, batch: TokenBatch) -> None:
        """One forward of the batch under the attached hooks, then the backward and the outputs it feeds."""
        self.captured.clear()
        if not (self.with_grad or self.outputs):
            if self.layers[-1] + 1 < self.n_layers:
                self.model(batch.tokens, stop_at_layer=self.layers[-1] + 1)
            else:
                self.model(batch.tokens, return_type=None)
            return
        logp = log_probs(self.model(batch.tokens))  # the logits themselves are not kept
        if self.with_grad:
            self.backward(batch, logp)
        if self.outputs:
            out = Output(self.variant, batch, logp.detach(), dict(self.captured))
            del logp
            for acc in self.outputs:
                acc.output(out)
        self.captured.clear()

    def backward(self, batch: TokenBatch, logp: Tensor) -> None:
        """``dL/da`` for every read layer from one backward of the batch's summed next-token cross-entropy."""
        loss = nll_from_log_probs(logp, batch.tokens)[batch.target_mask()].sum()
        grads = torch.autograd.grad(loss, [self.leaves[l] for l in self.layers])
        for layer, g in zip(self.layers, grads):
            self.feed(Observation(layer, self.leaves[layer].detach()[batch.mask], g[batch.mask], *self.rows, self.variant))
        self.leaves.clear()

    def run_batch(self, cpu_batch: TokenBatch, bar) -> None:
        self.rows = _rows(cpu_batch)
        batch = on_device(cpu_batch, self.device)
        self.mask = batch.mask
        for variant in range(len(self.variants)):
            self.variant = variant
            with attached_hooks(self.model, self.hook_set(variant)) if self.swap else nullcontext():
                self.forward(batch)
            bar.update()
        for acc in self.accumulators:
            end = getattr(acc, "end_batch", None)
            if end is not None:
                end(batch)

    def stream(self, batch_list: Sequence[TokenBatch], progress: bool, desc: str) -> None:
        whole_pass = [] if self.swap else self.hook_set(0)
        with (
            tqdm(total=len(batch_list) * len(self.variants), desc=desc, disable=not progress) as bar,
            attached_hooks(self.model, whole_pass),
            torch.set_grad_enabled(self.with_grad),
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext(),
        ):
            if self.with_grad:
                for p in self.model.parameters():
                    p.requires_grad_(False)  # attached_hooks restores the flags
            for batch in batch_list:
                self.run_batch(batch, bar)


def run(
    model,
    token_lists: Sequence[Tensor],
    accumulators: Sequence[Accumulator],
    batch_size: int = DEFAULT_BATCH_SIZE,
    by_length: bool = True,
    progress: bool = False,
    desc: str = "stream",
    variants: Sequence[Sequence[HookSpec]] = CLEAN,
    bf16: bool = False,
    shard: bool = True,
) -> None:
    """Stream ``token_lists`` through ``model`` in right-padded batches and feed every accumulator.

    ``by_length`` batches texts of similar length together, longest first (less padding); ``False`` keeps the
    given order (accumulators whose floating-point sums depend on order then see the texts as listed).
    ``variants``: the hook sets each batch runs under, in order (default: none, one forward per batch). ``bf16``:
    the pass under bf16 autocast. Under torchrun each rank streams its share of the batches and the accumulators
    are then folded across the ranks; ``shard=False``: every rank streams every batch, with no collective.
    """
    if len(variants) == 0:
        raise ValueError("variants must list at least one hook set (an empty one runs the model as it is).")
    device = model_device(model)
    p = _Pass(model, accumulators, [list(v) for v in variants], device, bf16)
    if p.idle:
        return
    batch_list = list(batches(model, token_lists, batch_size, by_length=by_length))
    if not shard:
        p.stream(batch_list, progress, desc)
        return
    mine = distributed.shard(batch_list, [b.tokens.numel() for b in batch_list])
    with distributed.shard_work(desc):
        p.stream(mine, progress, desc)
    distributed.reduce(accumulators, device)
