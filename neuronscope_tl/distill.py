"""Distillation of the kept output weights: after the neurons are chosen (and, with a refit, each layer's output
weights fitted by least squares), the output-weight changes and output biases of every pruned layer are trained
together so that the pruned model's next-token distributions match the dense model's on calibration text (the
recommended recipe: 65,536 tokens of the calibration sources, :func:`~neuronscope_tl.recipes.distill_windows`).

The least-squares refit matches each layer's own output on its own; it cannot see how an error left in one layer
grows through the layers after it. Distillation optimises what the user measures, the whole model's output: the
loss is the mean per-token KL(P_dense || P_pruned) over the windows, minimised with Adam over the
pruning's own parameters: every pruned layer's ``delta_out`` [d_mlp, d_model] (pruned rows held at zero) and, where
the pruning has one (mean ablation), its ``bias`` [d_model]. Nothing else changes: the result is again a :class:`~neuronscope_tl.surgery.PruneSpec`, simulated by
the same hooks and removed physically by the same surgery, so the saved model reloads in plain transformers.

Each step runs the dense model once (no gradients) and the pruned model once with gradients on a batch of
``batch_size`` windows, under bf16 autocast by default; the parameters stay fp32. The windows are shuffled with a
seeded generator, so a run is repeatable. Under ``torchrun`` each rank runs its share of every step's windows and
the gradients are summed over the ranks before the step, so every rank holds the same parameters; a rank that
raises still joins that step's sum with a failure flag, so every rank stops at the same step.

This is a training loop, not a streaming pass: it is the one place outside :func:`neuronscope_tl.engine.run` that
runs the model over calibration windows.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .arch import arch_for, output_matrix
from .engine import model_device
from .hooks import attached_hooks
from .metrics import kl_from_log_probs, log_probs
from .surgery import PruneSpec, simulation_hooks
from .texts import check_int

DEFAULT_DISTILL_LR = 3e-4  # of 1e-4, 3e-4 and 1e-3 at one epoch, best in- and out-of-domain (benchmarks/bench_domains.py)
DISTILL_BATCH = 2
MAX_DISTILL_EPOCHS = 100


@dataclass
class DistillResult:
    """A distilled :class:`~neuronscope_tl.surgery.PruneSpec` and how the training went.

    ``losses``: the mean per-token KL (nats) of each step's batch before that step's update, in order.
    ``epoch_losses``: their mean per epoch.
    """

    spec: PruneSpec
    epochs: int
    lr: float
    batch_size: int
    n_windows: int
    losses: List[float] = field(default_factory=list)
    epoch_losses: List[float] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict:
        """What the calibration record keeps of the training."""
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "n_windows": self.n_windows,
            "epoch_kl": [round(x, 5) for x in self.epoch_losses],
            "seconds": round(self.seconds, 1),
        }


def check_epochs(epochs) -> int:
    return check_int(epochs, "distillation epochs", 0, MAX_DISTILL_EPOCHS)


def check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < float(lr) <= 1:
        raise ValueError(f"the distillation learning rate must be a number in (0, 1], got {lr!r}.")
    return float(lr)


def trainable_spec(model, spec: PruneSpec) -> PruneSpec:
    """``spec`` with every pruned layer expressed as zeroed neurons plus an output-weight change (fp32 copies; zeros
    where ``spec`` has none) and, where ``spec`` has one, an output bias: the form distillation trains. Mean
    ablation without a refit (replacement values) is already folded into ``spec.bias``; the copy drops the
    replacement and keeps the bias. A zero-ablation spec stays without biases, so its saved model needs none.
    """
    arch = arch_for(model)
    w_out = output_matrix(model)
    out = PruneSpec(neurons={l: list(n) for l, n in spec.neurons.items()}, d_mlp=spec.d_mlp, ablation=spec.ablation)
    for layer, pruned in spec.neurons.items():
        if not pruned:
            continue
        delta = spec.delta_out.get(layer)
        out.delta_out[layer] = torch.zeros_like(w_out[layer]) if delta is None else delta.detach().float().clone()
        if layer in spec.bias:
            out.bias[layer] = spec.bias[layer].detach().float().clone()
        out.out_hooks[layer] = spec.out_hooks.get(layer, arch.mlp_out_hook(layer))
    return out


def distillation_kl(model, tokens: Tensor, spec: PruneSpec, bf16: bool = True) -> Tensor:
    """The summed per-token KL(P_dense || P_pruned) over ``tokens`` [batch, pos] (every position's next-token
    distribution), differentiable in ``spec``'s tensors; the dense model runs without gradients."""
    autocast = torch.autocast(tokens.device.type, torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        with torch.no_grad():
            dense = log_probs(model(tokens))
        with attached_hooks(model, simulation_hooks(spec, differentiable=True)):
            pruned = log_probs(model(tokens))
    return kl_from_log_probs(dense, pruned).sum()


def check_windows(windows) -> Tensor:
    if not isinstance(windows, Tensor) or windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ValueError(f"distillation needs a [n_windows >= 1, pos >= 2] tensor of token ids, got {shape}.")
    if windows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"distillation windows must hold integer token ids, got {windows.dtype}.")
    return windows


def distill_spec(
    model,
    spec: PruneSpec,
    windows: Tensor,
    epochs: int = 1,
    lr: float = DEFAULT_DISTILL_LR,
    batch_size: int = DISTILL_BATCH,
    bf16: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> DistillResult:
    """Train ``spec``'s output-weight changes and biases to match the dense model on ``windows`` [n, pos] (see the
    module docstring). ``spec`` itself is not changed; ``epochs=0`` returns its trainable form untrained."""
    epochs, lr = check_epochs(epochs), check_lr(lr)
    batch_size = check_int(batch_size, "distillation batch size", 1)
    windows = check_windows(windows)
    t0 = time.perf_counter()
    trained = trainable_spec(model, spec)
    result = DistillResult(trained, epochs, lr, batch_size, len(windows))
    layers = sorted(trained.delta_out)
    if not layers or epochs == 0:
        return result
    device = model_device(model)
    keep: Dict[int, Tensor] = {}
    params: List[Tensor] = []
    for layer in layers:
        mask = torch.ones(spec.d_mlp, 1)
        mask[torch.tensor(trained.neurons[layer])] = 0.0
        keep[layer] = mask.to(device)
        trained.delta_out[layer] = torch.nn.Parameter(trained.delta_out[layer].to(device) * keep[layer])
        params.append(trained.delta_out[layer])
        if layer in trained.bias:
            trained.bias[layer] = torch.nn.Parameter(trained.bias[layer].to(device))
            params.append(trained.bias[layer])
    for p in params:
        p.grad = torch.zeros_like(p)  # a rank with no window in a step still joins the gradient sum
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n_steps = -(-len(windows) // batch_size)
    with distributed.shard_work("distillation"), attached_hooks(model):
        model.eval()  # no dropout in either forward; attached_hooks restores the mode and the flags
        for p in model.parameters():
            p.requires_grad_(False)
        with tqdm(total=epochs * n_steps, desc="distillation", disable=not progress) as bar:
            for _ in range(epochs):
                order = torch.randperm(len(windows), generator=gen)
                epoch_losses = []
                for step in range(n_steps):
                    batch = order[step * batch_size : (step + 1) * batch_size].tolist()
                    opt.zero_grad(set_to_none=False)
                    loss = _step_gradients(model, windows, batch, trained, bf16, device, params)
                    for layer in layers:
                        trained.delta_out[layer].grad.mul_(keep[layer])  # pruned rows stay zero
                    opt.step()
                    epoch_losses.append(loss)
                    bar.update(1)
                result.losses += epoch_losses
                result.epoch_losses.append(sum(epoch_losses) / len(epoch_losses))
    for layer in layers:
        trained.delta_out[layer] = trained.delta_out[layer].detach().cpu() * keep[layer].cpu()
        if layer in trained.bias:
            trained.bias[layer] = trained.bias[layer].detach().cpu()
    result.seconds = time.perf_counter() - t0
    return result


def _step_gradients(model, windows: Tensor, batch: List[int], spec: PruneSpec, bf16: bool, device, params) -> float:
    """Accumulate one step's gradient of the batch's mean per-token KL into ``params`` (each rank: its share of the
    batch, then summed over the ranks with the loss and a failure flag in one collective) and return the loss.

    Under torchrun a rank that raises still joins the step's collective with its flag set, so every rank learns of
    the failure at the same step: the failed rank re-raises its error, the others raise :class:`DistributedError`.
    """
    mine = distributed.shard(batch)
    n_tokens = len(batch) * windows.shape[1]
    loss, failure = 0.0, None
    try:
        if mine:
            kl = distillation_kl(model, windows[mine].to(device), spec, bf16) / n_tokens
            kl.backward()
            loss = float(kl.detach())
    except Exception as exc:  # noqa: BLE001  (re-raised below, after the ranks agree)
        if not distributed.active():
            raise
        failure = exc
    if not distributed.active():
        return loss
    grads = [p.grad.reshape(-1) for p in params]
    flag = 1.0 if failure is not None else 0.0
    flat = torch.cat([*grads, torch.tensor([loss, flag], dtype=grads[0].dtype, device=grads[0].device)])
    summed = distributed.sum_tensor(flat, "distillation gradients")
    if failure is not None:
        raise failure
    if float(summed[-1]) > 0:
        raise distributed.DistributedError(
            f"rank {distributed.current().rank}: stopping because another rank failed during distillation."
        )
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(summed[offset : offset + n].view_as(p.grad))
        offset += n
    return float(summed[-2])
