"""Physical neuron removal: a smaller Hugging Face model that plain ``transformers`` loads.

A :class:`PruneSpec` says, per layer, which MLP neurons go and what replaces their contribution:

* ``zero``: nothing (the neuron's output weights are dropped);
* ``mean``: the neuron's mean activation times its output weights, folded into the output bias (FLAP's bias
  compensation, An et al. 2024);
* optionally a **least-squares refit** of the kept neurons' output weights (and the bias), which reconstructs the
  dense layer output from calibration activations (:func:`neuronscope_tl.obs.refit_output`, the structured OBS
  update of ZipLM / SparseGPT).

:func:`apply_spec` applies a spec to a fresh copy of the bridge's HF model (:func:`fresh_hf_copy`), narrowing each
MLP through the model family's adapter (:mod:`neuronscope_tl.arch`: rows of ``gate_proj``/``up_proj`` and columns
of ``down_proj`` for Llama-style models, columns of ``c_fc`` and rows of ``c_proj`` for GPT-2).

Per-layer-uniform pruning gives one smaller MLP width in the config. Pruning that leaves different widths per layer
(global scope) cannot be written in a standard config, so we write a **masked checkpoint** of the original shapes
(pruned weights set to zero) and say so in the result (``masked=True``); it is exact but not smaller.
"""

from __future__ import annotations

import copy
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

from . import activations
from .activations import DEFAULT_CALIB_TOKENS
from .arch import arch_for, clean_state_dict, output_matrix
from .export import Result
from .hooks import ablation_hooks, capture_hook, mlp_post_name
from .impact import ablation_values, check_ablation, check_candidates, make_plan
from .models import mlp_info
from .obs import refit_output
from .texts import calibration_texts, check_int, check_max_tokens

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


# ---------------------------------------------------------------------------------------------- HF surgery


def fresh_hf_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model with the bridge's current weights (the bridge wraps its HF model in place, so we rebuild)."""
    # transformers costs about 0.5 s to import; it is imported when a model is first rebuilt, not with the package.
    from transformers import AutoModelForCausalLM

    hf = model.original_model
    # from_config keeps the config object it is given: copy it, or the surgery would edit the bridge's config.
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config), attn_implementation="eager")
    state = clean_state_dict(model)
    missing = [k for k in fresh.state_dict() if k not in state]
    tied = {"lm_head.weight"} if getattr(hf.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise RuntimeError(f"could not map the bridge's weights onto a fresh {type(fresh).__name__}: missing {missing[:5]}")
    fresh.load_state_dict(state, strict=False)
    if tied:
        fresh.tie_weights()
    return fresh.to(dtype=next(hf.parameters()).dtype).eval()


def apply_spec(hf: torch.nn.Module, spec: PruneSpec) -> torch.nn.Module:
    """Remove (or, for non-uniform specs, zero) the spec's neurons in ``hf`` in place; returns ``hf``.

    Returns the same module with a config whose MLP width (``intermediate_size`` / ``n_inner``) is the new width
    (uniform specs) and ``mlp_bias=True`` on Llama-style configs when an output bias is needed.
    """
    arch = arch_for(hf)
    n_layers = len(arch.decoder_layers(hf))
    counts = {len(spec.neurons.get(l, ())) for l in range(n_layers)}
    shrink = len(counts) == 1
    need_bias = bool(spec.bias)
    new_width = spec.d_mlp - counts.pop() if shrink else spec.d_mlp
    with torch.no_grad():
        for layer in range(n_layers):
            w_out = arch.output_weights(hf, layer)
            if layer in spec.delta_out:
                w_out = w_out + spec.delta_out[layer]
            pruned = spec.neurons.get(layer, [])
            if not shrink:
                w_out[pruned] = 0.0
            keep = torch.as_tensor(spec.kept(layer) if shrink else list(range(spec.d_mlp)), dtype=torch.long)
            arch.shrink_mlp(arch.mlp(hf, layer), keep, w_out, spec.bias.get(layer), need_bias)
    arch.set_width(hf.config, new_width, need_bias)
    return hf


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
    width = arch_for(pruned).width(pruned.config)
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


def make_spec(model, neurons, ablation: str = "zero", means: Optional[Dict[int, Tensor]] = None,
              grams: Optional[Dict[int, Tensor]] = None) -> PruneSpec:
    """Build a :class:`PruneSpec` from validated neurons.

    ``ablation='mean'`` needs ``means`` ({layer: [d_mlp]}); a least-squares refit happens when ``grams`` (from
    :func:`~neuronscope_tl.activations.activation_grams`) is given, with an output bias when ``ablation='mean'``.
    """
    check_ablation(ablation)
    neurons = check_neuron_sets(model, neurons)
    d_mlp = mlp_info(model).d_mlp
    spec = PruneSpec(neurons=neurons, d_mlp=d_mlp, ablation=ablation)
    w_out_all = output_matrix(model)  # [L, d_mlp, d_model]
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
                compensate: bool = False, calib_texts: Optional[Sequence[str]] = None, calib_tokens: int = DEFAULT_CALIB_TOKENS,
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
    check_ablation(ablation)
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    if out is not None:
        check_out_dir(out, overwrite)
    if spec is None:
        chosen = check_neuron_sets(model, neurons)
        texts = list(calib_texts) if calib_texts is not None else calibration_texts()
        grams = activations.activation_grams(model, texts, sorted(chosen), calib_tokens) if compensate else None
        means = ablation_values(model, sorted(chosen), ablation, texts, calib_tokens) if ablation == "mean" and not compensate else None
        spec = make_spec(model, chosen, ablation, means, grams)
    if out is None:
        return apply_spec(fresh_hf_copy(model), spec)
    return save_pruned(model, spec, out, overwrite=overwrite, measure_latency=measure_latency)
