"""Physical neuron removal: a smaller Hugging Face model that plain ``transformers`` loads.

A :class:`PruneSpec` says, per layer, which MLP neurons go and what replaces their contribution:

* ``zero``: nothing (the neuron's output weights are dropped);
* ``mean``: the neuron's mean activation times its output weights, folded into the output bias (FLAP's bias
  compensation, An et al. 2024);
* optionally a **least-squares refit** of the kept neurons' output weights (and the bias), which reconstructs the
  dense layer output from calibration activations. This is the structured Optimal Brain Surgeon update of ZipLM
  (Kurtic et al. 2023) / SparseGPT (Frantar & Alistarh 2023) on the input side of the MLP's output projection,
  using the activation Gram matrix ``G = E[a a^T]``: ``W_K' = W_K + G_KK^-1 G_KP W_P``.

:func:`build_pruned_hf` applies a spec to a fresh copy of the bridge's HF model:

* Llama-style (gate/up/down): rows of ``gate_proj``/``up_proj`` and columns of ``down_proj`` are removed. An output
  bias needs ``mlp_bias=True`` in the config, which also gives gate and up a bias; those are set to zero.
* GPT-2-style (``Conv1D``): columns of ``c_fc`` (and its bias entries) and rows of ``c_proj``; the extra bias is
  added to ``c_proj.bias``.

Per-layer-uniform pruning gives one smaller ``intermediate_size``. Pruning that leaves different widths per layer
(global scope) cannot be written in a standard config, so we write a **masked checkpoint** of the original shapes
(pruned weights set to zero) and say so in the result (``masked=True``); it is exact but not smaller.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .export import Result
from .models import mlp_info

Neurons = Dict[int, List[int]]


# ---------------------------------------------------------------------------------------------- the spec


@dataclass
class PruneSpec:
    """What to remove and what replaces it, per layer.

    Attributes:
        neurons: {layer: sorted pruned neuron indices}; layers without pruning may be absent.
        d_mlp: the MLP width before pruning.
        ablation: ``zero`` or ``mean`` (how the pruned neurons are replaced).
        bias: {layer: [d_model] extra output bias} (mean ablation or refit), or empty.
        delta_out: {layer: [d_mlp, d_model] change of the output weights (pruned rows zero)} from a
            least-squares refit, or empty.
        replacement: {layer: [n_pruned] mean activations} for mean ablation without refit (what the hook
            simulation writes; ``bias`` holds the same thing folded through the output weights).
    """

    neurons: Neurons
    d_mlp: int
    ablation: str = "zero"
    bias: Dict[int, Tensor] = field(default_factory=dict)
    delta_out: Dict[int, Tensor] = field(default_factory=dict)
    replacement: Dict[int, Tensor] = field(default_factory=dict)

    @property
    def n_pruned(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    @property
    def uniform(self) -> bool:
        """True when every layer loses the same number of neurons (a standard config can express it)."""
        return len({len(v) for v in self.neurons.values()}) <= 1

    def kept(self, layer: int) -> List[int]:
        gone = set(self.neurons.get(layer, ()))
        return [n for n in range(self.d_mlp) if n not in gone]


def refit_output(gram: Tensor, w_out: Tensor, pruned: Sequence[int], with_bias: bool, damp: float = 0.01) -> Tuple[Tensor, Optional[Tensor]]:
    """Least-squares refit of the kept neurons' output weights after removing ``pruned`` (ZipLM/SparseGPT OBS).

    Args:
        gram: [d_mlp + 1, d_mlp + 1] Gram matrix of the activations augmented with a constant 1 (last index).
        w_out: [d_mlp, d_model] output weights.
        pruned: neurons removed.
        with_bias: also refit an output bias (the constant input); otherwise the constant is not used.

    Returns:
        (delta [d_mlp, d_model] with zero rows for pruned neurons, bias [d_model] or None).
        Minimises ``E || a W - (a_K (W_K + delta_K) + b) ||^2`` over calibration tokens: ``delta_K = G_KK^-1 G_KP W_P``.
    """
    d = w_out.shape[0]
    p = torch.as_tensor(sorted(pruned), dtype=torch.long)
    mask = torch.ones(d, dtype=torch.bool)
    mask[p] = False
    k = torch.nonzero(mask).squeeze(1)
    if with_bias:
        k = torch.cat([k, torch.tensor([d])])
    g = gram.double()
    g_kk = g[k][:, k]
    g_kp = g[k][:, p]
    # Dampening as in SparseGPT (1% of the mean diagonal) keeps the solve stable for dead neurons.
    g_kk = g_kk + damp * g.diagonal()[:d].mean().clamp_min(1e-12) * torch.eye(len(k), dtype=g.dtype)
    update = torch.linalg.solve(g_kk, g_kp @ w_out.double()[p])  # [|K|(+1), d_model]
    delta = torch.zeros_like(w_out, dtype=torch.float64)
    n_kept = int(mask.sum())
    delta[mask] = update[:n_kept]
    bias = update[n_kept].float() if with_bias else None
    return delta.float(), bias


def obs_order(gram: Tensor, w_out: Tensor, n_remove: int, keep_constant: bool = True,
              block: Optional[int] = None, damp: float = 0.01) -> Tuple[List[int], List[float]]:
    """Greedy structured OBS (ZipLM, Kurtic et al. 2023): repeatedly remove the neurons whose removal, after the
    optimal refit of the others, adds the least output error ``||w_i||^2 / [G^-1]_ii``.

    ``block`` neurons are removed per step with the exact block update (default ``d_mlp // 128``, at least 1:
    about 12x fewer updates on SmolLM2 for a small loss in greediness). Returns the removal order and the
    cumulative squared reconstruction error per token after each removal (exact at block ends). The constant
    input (last index of ``gram``) is never removed when ``keep_constant``; otherwise it is dropped.
    """
    d = w_out.shape[0]
    block = max(1, d // 128) if block is None else max(1, int(block))
    g = gram.double().clone()
    if not keep_constant:
        g = g[:d, :d]
    size = g.shape[0]
    g += damp * g.diagonal()[:d].mean().clamp_min(1e-12) * torch.eye(size, dtype=g.dtype)
    h_inv = torch.linalg.inv(g)
    w = torch.zeros(size, w_out.shape[1], dtype=torch.float64)
    w[:d] = w_out.double()
    alive = torch.ones(size, dtype=torch.bool)
    alive[d:] = False  # the constant can absorb error but is never a candidate
    order: List[int] = []
    errors: List[float] = []
    total = 0.0
    while len(order) < n_remove:
        err = w.square().sum(1) / h_inv.diagonal()
        err[~alive] = torch.inf
        b = min(block, n_remove - len(order))
        idx = err.topk(b, largest=False).indices
        h_bb_inv = torch.linalg.inv(h_inv[idx][:, idx])
        w_b = w[idx]
        step_err = float(torch.einsum("ik,ij,jk->", w_b, h_bb_inv, w_b))
        singles = err[idx]
        share = (singles / singles.sum().clamp_min(1e-30)).tolist()
        for i, frac in zip(idx.tolist(), share):
            order.append(i)
            total += step_err * frac
            errors.append(total)
        cols = h_inv[:, idx]
        w -= cols @ (h_bb_inv @ w_b)
        h_inv -= cols @ h_bb_inv @ cols.t()
        alive[idx] = False
        w[idx] = 0.0
    return order, errors


# ---------------------------------------------------------------------------------------------- HF surgery


def _mlp(hf, layer: int):
    if hasattr(hf, "transformer"):
        return hf.transformer.h[layer].mlp
    return hf.model.layers[layer].mlp


def is_gpt2_style(hf) -> bool:
    return hasattr(hf, "transformer") and hasattr(_mlp(hf, 0), "c_fc")


def output_weights(hf, layer: int) -> Tensor:
    """[d_mlp, d_model] output weights of one MLP (the ``W_out`` convention), fp32 copy."""
    mlp = _mlp(hf, layer)
    if is_gpt2_style(hf):
        return mlp.c_proj.weight.detach().float().clone()
    return mlp.down_proj.weight.detach().float().t().clone()


def fresh_hf_copy(model):
    """A plain HF model with the bridge's current weights (the bridge wraps its HF model in place, so we rebuild)."""
    from transformers import AutoModelForCausalLM

    import copy as _copy

    hf = model.original_model
    # from_config keeps the config object it is given: copy it, or the surgery would edit the bridge's config.
    copy = AutoModelForCausalLM.from_config(_copy.deepcopy(hf.config), attn_implementation="eager")
    want = copy.state_dict()
    state = {}
    for key, value in hf.state_dict().items():
        clean = key.replace("._original_component", "")
        if clean in want and clean not in state:
            state[clean] = value.detach().clone()
    missing = [k for k in want if k not in state]
    tied = {"lm_head.weight"} if getattr(hf.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise RuntimeError(f"could not map the bridge's weights onto a fresh {type(copy).__name__}: missing {missing[:5]}")
    copy.load_state_dict(state, strict=False)
    if tied:
        copy.tie_weights()
    return copy.to(dtype=next(hf.parameters()).dtype).eval()


def apply_spec(hf, spec: PruneSpec):
    """Remove (or, for non-uniform specs, zero) the spec's neurons in ``hf`` in place; returns ``hf``.

    Returns the same module with a config whose ``intermediate_size`` / ``n_inner`` is the new width (uniform
    specs) and ``mlp_bias=True`` on Llama-style configs when an output bias is needed.
    """
    gpt2 = is_gpt2_style(hf)
    n_layers = hf.config.num_hidden_layers if not gpt2 else hf.config.n_layer
    counts = {len(spec.neurons.get(l, ())) for l in range(n_layers)}
    shrink = len(counts) == 1
    need_bias = bool(spec.bias)
    new_width = spec.d_mlp - counts.pop() if shrink else spec.d_mlp
    with torch.no_grad():
        for layer in range(n_layers):
            mlp = _mlp(hf, layer)
            w_out = output_weights(hf, layer)
            if layer in spec.delta_out:
                w_out = w_out + spec.delta_out[layer]
            pruned = spec.neurons.get(layer, [])
            if not shrink:
                w_out[pruned] = 0.0
            keep = torch.as_tensor(spec.kept(layer) if shrink else list(range(spec.d_mlp)), dtype=torch.long)
            extra = spec.bias.get(layer)
            if gpt2:
                _shrink_gpt2(mlp, keep, w_out, extra)
            else:
                _shrink_llama(mlp, keep, w_out, extra, need_bias)
    if gpt2:
        hf.config.n_inner = new_width
    else:
        hf.config.intermediate_size = new_width
        if need_bias:
            hf.config.mlp_bias = True
    return hf


def _linear(weight: Tensor, bias: Optional[Tensor]) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    lin.weight = torch.nn.Parameter(weight.contiguous())
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.contiguous())
    return lin


def _shrink_llama(mlp, keep: Tensor, w_out: Tensor, extra: Optional[Tensor], need_bias: bool) -> None:
    dtype = mlp.down_proj.weight.dtype
    zeros = (lambda n: torch.zeros(n, dtype=dtype)) if need_bias else (lambda n: None)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        b = old.bias[keep].detach().clone() if old.bias is not None else zeros(len(keep))
        setattr(mlp, name, _linear(old.weight[keep].detach().clone(), b))
    d_model = w_out.shape[1]
    old_b = mlp.down_proj.bias.detach().clone() if mlp.down_proj.bias is not None else zeros(d_model)
    if extra is not None:
        old_b = old_b + extra.to(dtype)
    mlp.down_proj = _linear(w_out[keep].t().to(dtype), old_b)


def _shrink_gpt2(mlp, keep: Tensor, w_out: Tensor, extra: Optional[Tensor]) -> None:
    from transformers.pytorch_utils import Conv1D

    dtype = mlp.c_proj.weight.dtype
    fc = Conv1D(len(keep), mlp.c_fc.weight.shape[0])
    fc.weight = torch.nn.Parameter(mlp.c_fc.weight[:, keep].detach().clone())
    fc.bias = torch.nn.Parameter(mlp.c_fc.bias[keep].detach().clone())
    proj = Conv1D(w_out.shape[1], len(keep))
    proj.weight = torch.nn.Parameter(w_out[keep].to(dtype).contiguous())
    b = mlp.c_proj.bias.detach().clone()
    if extra is not None:
        b = b + extra.to(dtype)
    proj.bias = torch.nn.Parameter(b)
    mlp.c_fc, mlp.c_proj = fc, proj


# ---------------------------------------------------------------------------------------------- measuring


def count_parameters(hf) -> Tuple[int, int]:
    """(unique parameters, MLP parameters) of a plain HF model; tied matrices counted once."""
    seen, total, mlp = set(), 0, 0
    for name, p in hf.named_parameters(remove_duplicate=False):
        key = p.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
        if ".mlp." in name:
            mlp += p.numel()
    return total, mlp


def median_latency(hf, n_tokens: int = 512, repeats: int = 5, vocab: Optional[int] = None) -> float:
    """Median wall time in seconds of a forward over ``n_tokens`` random tokens (one warm-up first)."""
    vocab = vocab or int(hf.config.vocab_size)
    n_ctx = int(getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", n_tokens))
    ids = torch.randint(0, vocab, (1, min(n_tokens, n_ctx)), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        hf(ids)
        for _ in range(repeats):
            t = time.perf_counter()
            hf(ids)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def dir_size(path: Union[str, Path]) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))


@dataclass
class PrunedModel(Result):
    """A saved pruned model and what changed.

    Attributes:
        out: the directory written (``save_pretrained`` with its tokenizer; loads in plain transformers).
        masked: True when the widths differ per layer and the checkpoint keeps the original shapes with the
            pruned weights set to zero (exact, but not smaller).
        d_mlp_before / d_mlp_after: MLP width before and after (after = before when masked).
        parameters_before / parameters_after, mlp_parameters_before / mlp_parameters_after: unique counts.
        file_bytes_before / file_bytes_after: size of the weight files of the dense and pruned checkpoints.
        latency_s_before / latency_s_after: median CPU forward time over ``latency_tokens`` tokens.
    """

    out: str
    ablation: str
    compensated: bool
    masked: bool
    n_pruned: int
    d_mlp_before: int
    d_mlp_after: int
    parameters_before: int
    parameters_after: int
    mlp_parameters_before: int
    mlp_parameters_after: int
    file_bytes_before: int
    file_bytes_after: int
    latency_tokens: int
    latency_s_before: Optional[float]
    latency_s_after: Optional[float]


def check_out_dir(out: Union[str, Path], overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory; give a new or empty directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output directory {out} exists and is not empty; give a new or empty directory, or overwrite=True (--overwrite).")
    return out


def save_pruned(model, spec: PruneSpec, out: Union[str, Path], overwrite: bool = False, measure_latency: bool = True,
                latency_tokens: int = 512, latency_repeats: int = 5) -> PrunedModel:
    """Apply ``spec`` to a fresh HF copy of ``model`` and ``save_pretrained`` it (with the tokenizer) into ``out``.

    The directory is written in a temporary sibling first and renamed into place, so a failure leaves no partial
    model behind.
    """
    from .texts import check_int

    latency_tokens = check_int(latency_tokens, "latency_tokens", 1)
    latency_repeats = check_int(latency_repeats, "latency_repeats", 1, 1000)
    out = check_out_dir(out, overwrite)
    dense = fresh_hf_copy(model)
    total0, mlp0 = count_parameters(dense)
    lat0 = median_latency(dense, latency_tokens, latency_repeats) if measure_latency else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        dense.save_pretrained(tmp / "dense")
        bytes0 = dir_size(tmp / "dense")
        shutil.rmtree(tmp / "dense")
        pruned = apply_spec(dense, spec)
        total1, mlp1 = count_parameters(pruned)
        lat1 = median_latency(pruned, latency_tokens, latency_repeats) if measure_latency else None
        pruned.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        bytes1 = dir_size(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    width = int(pruned.config.n_inner if is_gpt2_style(pruned) else pruned.config.intermediate_size)
    return PrunedModel(
        out=str(out), ablation=spec.ablation, compensated=bool(spec.delta_out), masked=not spec.uniform,
        n_pruned=spec.n_pruned, d_mlp_before=spec.d_mlp, d_mlp_after=width,
        parameters_before=total0, parameters_after=total1, mlp_parameters_before=mlp0, mlp_parameters_after=mlp1,
        file_bytes_before=bytes0, file_bytes_after=bytes1, latency_tokens=latency_tokens,
        latency_s_before=lat0, latency_s_after=lat1,
    )


# ---------------------------------------------------------------------------------------------- specs and hooks


def check_neuron_sets(model, neurons) -> Neurons:
    """Normalise ``{layer: [neurons]}``, (layer, neuron) pairs or a DataFrame with layer/neuron columns.

    Raises ValueError for layers or neurons out of range (valid: layers 0..n_layers-1, neurons 0..d_mlp-1),
    duplicates, or a layer losing all its neurons.
    """
    from .impact import check_candidates

    if isinstance(neurons, dict):
        neurons = [(l, n) for l, ns_ in neurons.items() for n in ns_]
    pairs = check_candidates(model, neurons)
    out: Neurons = {}
    for layer, n in pairs:
        out.setdefault(layer, []).append(n)
    d_mlp = mlp_info(model).d_mlp
    for layer, ns_ in out.items():
        if len(ns_) >= d_mlp:
            raise ValueError(f"layer {layer} would lose all {d_mlp} neurons; prune at most {d_mlp - 1} per layer.")
        ns_.sort()
    return dict(sorted(out.items()))


def activation_grams(model, texts: Sequence[str], layers: Sequence[int], max_tokens: Optional[int] = 8192) -> Dict[int, Tensor]:
    """Per layer, the Gram matrix ``E[ã ã^T]`` [d_mlp + 1, d_mlp + 1] of the MLP activations augmented with a
    constant 1 (its last row holds the mean activations), over the first ``max_tokens`` tokens of ``texts``."""
    from .hooks import attached_hooks, mlp_post_name
    from .texts import tokenize

    token_lists = tokenize(model, texts, max_tokens=max_tokens)
    d = mlp_info(model).d_mlp
    sums = {l: torch.zeros(d + 1, d + 1) for l in layers}
    count = [0]

    def make_hook(layer):
        def hook(act, hook=None):
            a = act.detach().reshape(-1, d).float().cpu()
            a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
            sums[layer] += a.t() @ a

        return hook

    stop = max(layers) + 1
    with attached_hooks(model, [(mlp_post_name(l), make_hook(l)) for l in layers]), torch.no_grad():
        for ids in token_lists:
            model(ids[None], stop_at_layer=stop) if stop < mlp_info(model).n_layers else model(ids[None], return_type=None)
            count[0] += ids.numel()
    return {l: s / max(count[0], 1) for l, s in sums.items()}


def make_spec(model, neurons, ablation: str = "zero", means: Optional[Dict[int, Tensor]] = None,
              grams: Optional[Dict[int, Tensor]] = None) -> PruneSpec:
    """Build a :class:`PruneSpec` from validated neurons.

    ``ablation='mean'`` needs ``means`` ({layer: [d_mlp]}); a least-squares refit happens when ``grams`` (from
    :func:`activation_grams`) is given, with an output bias when ``ablation='mean'``.
    """
    from .impact import check_ablation

    check_ablation(ablation)
    neurons = check_neuron_sets(model, neurons)
    d_mlp = mlp_info(model).d_mlp
    spec = PruneSpec(neurons=neurons, d_mlp=d_mlp, ablation=ablation)
    w_out_all = model.W_out.detach().float().cpu()  # [L, d_mlp, d_model]
    for layer, pruned in neurons.items():
        w_out = w_out_all[layer]
        if grams is not None:
            delta, bias = refit_output(grams[layer], w_out, pruned, with_bias=ablation == "mean")
            spec.delta_out[layer] = delta
            if bias is not None:
                spec.bias[layer] = bias
        elif ablation == "mean":
            if means is None:
                raise ValueError("mean ablation needs each neuron's mean activation (means={layer: [d_mlp]}).")
            values = means[layer].float()[torch.tensor(pruned)]
            spec.replacement[layer] = values
            spec.bias[layer] = values @ w_out[pruned]
    return spec


def simulation_hooks(spec: PruneSpec) -> list:
    """Hooks that simulate ``spec`` on the bridge, for use with :func:`attached_hooks`.

    Pruned neurons are ablated on ``mlp.hook_post`` through the core's :func:`make_plan`/:func:`ablation_hooks`
    (zero, or the mean activations); a refit adds ``a_ablated @ delta + bias`` on ``mlp.hook_out``.
    """
    from .hooks import ablation_hooks, capture_hook, mlp_post_name
    from .impact import make_plan

    pairs = [(l, n) for l, ns_ in spec.neurons.items() for n in ns_]
    values = {l: None for l in spec.neurons}
    for l, repl in spec.replacement.items():
        full = torch.zeros(spec.d_mlp)
        full[torch.tensor(spec.neurons[l])] = repl
        values[l] = full
    hooks = ablation_hooks(make_plan(pairs, values))
    store: dict = {}
    for layer, delta in spec.delta_out.items():
        hooks.append((mlp_post_name(layer), capture_hook(store, str(layer))))
        hooks.append((f"blocks.{layer}.mlp.hook_out", _refit_hook(store, str(layer), delta, spec.bias.get(layer))))
    return hooks


def _refit_hook(store: dict, key: str, delta: Tensor, bias: Optional[Tensor]):
    def hook(out: Tensor, hook=None) -> Tensor:
        a = store.pop(key)
        extra = a @ delta.to(device=a.device, dtype=a.dtype)
        if bias is not None:
            extra = extra + bias.to(device=a.device, dtype=a.dtype)
        return out + extra.to(out.dtype)

    return hook


def prune_model(model, neurons, ablation: str = "zero", out: Optional[Union[str, Path]] = None,
                compensate: bool = False, calib_texts: Optional[Sequence[str]] = None, calib_tokens: int = 8192,
                overwrite: bool = False, measure_latency: bool = True, spec: Optional[PruneSpec] = None):
    """Remove ``neurons`` from ``model`` physically.

    Args:
        neurons: {layer: [neuron]}, (layer, neuron) pairs, or a DataFrame with layer/neuron columns.
        ablation: ``zero`` or ``mean`` (mean activation folded into the output bias).
        out: directory to ``save_pretrained`` into; None returns the in-memory HF model without saving.
        compensate: least-squares refit of the kept output weights on ``calib_tokens`` calibration tokens.
        calib_texts: calibration texts (default: the Lee calibration split).
        spec: a prebuilt :class:`PruneSpec` (as :func:`prune_curve` makes); overrides the other arguments.

    Returns a :class:`PrunedModel` (when ``out`` is given) or the pruned plain HF model.
    """
    from .impact import ablation_values, check_ablation
    from .texts import calibration_texts, check_max_tokens

    check_ablation(ablation)
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    if out is not None:
        check_out_dir(out, overwrite)
    if spec is None:
        chosen = check_neuron_sets(model, neurons)
        texts = list(calib_texts) if calib_texts is not None else calibration_texts()
        grams = activation_grams(model, texts, sorted(chosen), calib_tokens) if compensate else None
        means = ablation_values(model, sorted(chosen), ablation, texts, calib_tokens) if ablation == "mean" and not compensate else None
        spec = make_spec(model, chosen, ablation, means, grams)
    if out is None:
        return apply_spec(fresh_hf_copy(model), spec)
    return save_pruned(model, spec, out, overwrite=overwrite, measure_latency=measure_latency)
