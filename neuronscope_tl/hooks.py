"""The one place where neuronscope_tl attaches hooks, and the ablation hook functions.

Every analysis attaches its hooks through :func:`attached_hooks`, a context manager built on TransformerLens's
own ``model.hooks(...)``: it removes exactly the hooks it added when the body ends, also when the body raises
(including ``KeyboardInterrupt``). :func:`hook_count` lets tests check that the count returns to where it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

HookSpec = Tuple[Union[str, Callable[[str], bool]], Callable]


def mlp_post_name(layer: int) -> str:
    """Hook point on the MLP's hidden activations (the input of W_out): [batch, pos, d_mlp]."""
    return f"blocks.{layer}.mlp.hook_post"


def resid_post_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def is_mlp_post(name: str) -> bool:
    return name.startswith("blocks.") and name.endswith(".mlp.hook_post")


def layer_of(hook_name: str) -> int:
    return int(hook_name.split(".")[1])


def hook_count(model) -> int:
    """Total number of forward and backward hook functions attached to the model's hook points.

    ``hook_dict`` lists aliases (``mlp.hook_post`` is ``mlp.out.hook_in``), so each hook point is counted once.
    """
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in points)


@contextmanager
def attached_hooks(model, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()) -> Iterator:
    """Attach hooks for the duration of a ``with`` block; they are removed on exit, whatever happens.

    Also restores ``model.training`` and the parameters' ``requires_grad`` flags, so no analysis can leave the
    model in another mode.
    """
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    try:
        with model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks)):
            yield model
    finally:
        if model.training != was_training:
            model.train(was_training)
        for p, flag in zip(model.parameters(), grad_flags):
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def ablation_hook(neurons: Sequence[int], values: Optional[Tensor] = None) -> Callable:
    """A hook on ``mlp.hook_post`` that replaces the given neurons' activations.

    ``values=None`` sets them to zero (zero ablation); otherwise ``values[i]`` is written for ``neurons[i]`` at
    every position (mean ablation passes each neuron's mean activation).
    """
    index = torch.as_tensor(list(neurons), dtype=torch.long)

    def hook(act: Tensor, hook=None) -> Tensor:
        act = act.clone()
        idx = index.to(act.device)
        if values is None:
            act[..., idx] = 0.0
        else:
            act[..., idx] = values.to(device=act.device, dtype=act.dtype)
        return act

    return hook


def ablation_hooks(plan: dict) -> List[HookSpec]:
    """Hooks for a multi-layer ablation plan ``{layer: (neurons, values_or_None)}``."""
    return [(mlp_post_name(layer), ablation_hook(neurons, values)) for layer, (neurons, values) in sorted(plan.items())]


def capture_hook(store: dict, key: str, detach: bool = True) -> Callable:
    """A hook that records its activation under ``store[key]`` and changes nothing; ``detach=False`` keeps it in
    the autograd graph (for a later hook whose output must pass gradients back through it)."""

    def hook(act: Tensor, hook=None) -> None:
        store[key] = act.detach() if detach else act

    return hook
