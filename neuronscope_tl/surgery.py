"""Physical neuron removal: a smaller Hugging Face model that plain ``transformers`` loads, or a smaller
``HookedTransformer`` that TransformerLens 3.x loads.

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
(``global`` and ``owl`` scopes) cannot be written in a standard config, which holds one width: every layer is stored
at the **widest layer's width**, narrower layers padded with pruned neurons whose output weights are zero
(:func:`stored_neurons`). The result says so (``masked=True``); it is exact, and it saves what the widest layer
saves, not the average.

A ``HookedTransformer`` (TransformerLens 3.x) is narrowed in its own weights (:func:`apply_spec_hooked`): columns of
``W_in``/``W_gate``/``b_in`` and rows of ``W_out`` go, the extra bias is added to ``b_out`` and the config's
``d_mlp`` shrinks. :func:`save_pruned` writes it as ``tl_config.json`` (the ``HookedTransformerConfig``, dtype as
its name) plus ``model.safetensors`` (its state dict) and the tokenizer, which TransformerLens alone reloads
(:func:`load_hooked`, a few lines that use nothing of neuronscope_tl). When the model holds the raw weights of a
known checkpoint directory (``load_model(..., kind="hooked")`` records it), the same spec is also applied to that
HF checkpoint and saved under ``hf/``. The processed weights of ``from_pretrained`` (norms folded, writing weights
centred) are not a HF checkpoint's, so no HF copy is written for them.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import activations
from .activations import DEFAULT_CALIB_TOKENS
from .arch import RAW, SOURCE_ATTR, HookedArch, arch_for, clean_state_dict, output_matrix, weight_source
from .export import Result, atomic_directory
from .hooks import ablation_hooks, capture_hook, mlp_post_name
from .impact import ablation_values, check_ablation, check_candidates, make_plan
from .models import mlp_info
from .obs import DEFAULT_DAMP, refit_output
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
        out_hooks: {layer: the hook point right after the MLP's output projection} for layers with a refit, from
            the model kind's adapter (``mlp.hook_out`` on a bridge, ``hook_mlp_out`` on a HookedTransformer).
    """

    neurons: Neurons
    d_mlp: int
    ablation: str = "zero"
    bias: Dict[int, Tensor] = field(default_factory=dict)
    delta_out: Dict[int, Tensor] = field(default_factory=dict)
    replacement: Dict[int, Tensor] = field(default_factory=dict)
    out_hooks: Dict[int, str] = field(default_factory=dict)

    @property
    def n_pruned(self) -> int:
        return sum(len(v) for v in self.neurons.values())

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


def stored_neurons(spec: PruneSpec, n_layers: int) -> Tuple[int, Dict[int, List[int]]]:
    """(the stored MLP width, {layer: neurons stored}) of a pruned checkpoint.

    A standard config holds one MLP width, so every layer stores the widest layer's kept neurons: the kept
    neurons, padded (in layers that lost more) with pruned neurons whose output weights are zeroed, which add
    exactly nothing. A uniform spec needs no padding.
    """
    width = spec.d_mlp - min(len(spec.neurons.get(l, ())) for l in range(n_layers))
    stored = {}
    for layer in range(n_layers):
        kept = spec.kept(layer)
        stored[layer] = sorted(kept + sorted(spec.neurons.get(layer, ()))[: width - len(kept)])
    return width, stored


def padded(spec: PruneSpec, n_layers: int) -> bool:
    """Whether a checkpoint of ``spec`` stores zeroed padding neurons: the layers lost different numbers of neurons
    (a layer the spec does not name lost none)."""
    return len({len(spec.neurons.get(l, ())) for l in range(n_layers)}) > 1


def pruned_output_weights(spec: PruneSpec, layer: int, w_out: Tensor) -> Tensor:
    """``W_out`` [d_mlp, d_model] of one pruned layer: the refit's ``delta_out`` added, pruned rows zeroed."""
    if layer in spec.delta_out:
        w_out = w_out + spec.delta_out[layer].to(w_out.device)
    w_out[list(spec.neurons.get(layer, ()))] = 0.0
    return w_out


def apply_spec(hf: torch.nn.Module, spec: PruneSpec) -> torch.nn.Module:
    """Remove the spec's neurons in ``hf`` in place (to the widest layer's width, see :func:`stored_neurons`);
    returns ``hf`` with a config whose MLP width (``intermediate_size`` / ``n_inner``) is the new width and
    ``mlp_bias=True`` on Llama-style configs when an output bias is needed.
    """
    arch = arch_for(hf)
    n_layers = len(arch.decoder_layers(hf))
    need_bias = bool(spec.bias)
    width, stored = stored_neurons(spec, n_layers)
    with torch.no_grad():
        for layer in range(n_layers):
            w_out = pruned_output_weights(spec, layer, arch.output_weights(hf, layer))
            keep = torch.as_tensor(stored[layer], dtype=torch.long)
            arch.shrink_mlp(arch.mlp(hf, layer), keep, w_out, spec.bias.get(layer), need_bias)
    arch.set_width(hf.config, width, need_bias)
    return hf


# ---------------------------------------------------------------------------------------------- HookedTransformer surgery


def apply_spec_hooked(model: torch.nn.Module, spec: PruneSpec) -> torch.nn.Module:
    """A new HookedTransformer with ``spec`` applied to a copy of ``model``'s weights (``model`` is untouched).

    ``d_mlp`` shrinks to the widest layer's width (:func:`stored_neurons`): the stored columns of
    ``W_in``/``W_gate``/``b_in`` and rows of ``W_out`` (plus the refit's ``delta_out``; padding rows zeroed) stay,
    and the extra bias is added to ``b_out``. The config is rebuilt with ``from_dict`` so that its derived fields
    (parameter count) follow the new width.
    """
    n_layers = int(model.cfg.n_layers)
    width, stored = stored_neurons(spec, n_layers)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gated = bool(model.cfg.gated_mlp)
    with torch.no_grad():
        for layer in range(n_layers):
            pre = f"blocks.{layer}.mlp."
            dtype = state[pre + "W_out"].dtype
            w_out = pruned_output_weights(spec, layer, state[pre + "W_out"].float())
            keep = torch.as_tensor(stored[layer], dtype=torch.long)
            state[pre + "W_out"] = w_out[keep].to(dtype).contiguous()
            for name in ("W_in", "W_gate") if gated else ("W_in",):
                state[pre + name] = state[pre + name][:, keep].contiguous()
            state[pre + "b_in"] = state[pre + "b_in"][keep].contiguous()
            if layer in spec.bias:
                state[pre + "b_out"] = state[pre + "b_out"] + spec.bias[layer].to(state[pre + "b_out"])
    cfg = type(model.cfg).from_dict({**copy.deepcopy(model.cfg.to_dict()), "d_mlp": width, "n_params": None})
    pruned_model = type(model)(cfg, model.tokenizer, move_to_device=False)
    pruned_model.load_state_dict(state, strict=True)
    pruned_model.eval()
    for attr in ("neuronscope_weights",):
        if hasattr(model, attr):
            setattr(pruned_model, attr, getattr(model, attr))
    return pruned_model


def hooked_config_json(cfg) -> dict:
    """A HookedTransformerConfig as JSON-able values: the dtype by name (``float32``), the device as a string."""
    out = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        elif isinstance(value, torch.device):
            value = str(value)
        out[key] = value
    json.dumps(out)  # every value must be JSON; a TypeError here names the field
    return out


def save_hooked(model: torch.nn.Module, out: Union[str, Path]) -> None:
    """Write a HookedTransformer into the directory ``out``: ``tl_config.json``, ``model.safetensors`` (its whole
    state dict, parameters and buffers) and the tokenizer. :func:`load_hooked` reads it back."""
    from safetensors.torch import save_file  # installed with transformers; imported only when a model is saved

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tl_config.json").write_text(json.dumps(hooked_config_json(model.cfg), indent=1))
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)


def load_hooked(path: Union[str, Path]):
    """Reload a directory written by :func:`save_hooked` with TransformerLens alone (the same few lines work
    without neuronscope_tl)::

        cfg = json.loads((path / "tl_config.json").read_text()); cfg["dtype"] = getattr(torch, cfg["dtype"])
        model = HookedTransformer(HookedTransformerConfig.from_dict(cfg), AutoTokenizer.from_pretrained(path))
        model.load_state_dict(safetensors.torch.load_file(path / "model.safetensors"))
    """
    from safetensors.torch import load_file  # installed with transformers; imported only when a model is loaded
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # TransformerLens 3.x only
    from transformers import AutoTokenizer  # about 0.5 s; imported only when a model is loaded

    path = Path(path)
    cfg = json.loads((path / "tl_config.json").read_text())
    cfg["dtype"] = getattr(torch, cfg["dtype"])
    model = HookedTransformer(HookedTransformerConfig.from_dict(cfg), AutoTokenizer.from_pretrained(path), move_to_device=False)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()


def hooked_parameters(model) -> Tuple[int, int]:
    """(parameters, MLP parameters) of a HookedTransformer."""
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for name, p in model.named_parameters() if ".mlp." in name)
    return total, mlp


def save_pruned_hooked(
    model, spec: PruneSpec, out: Path, measure_latency: bool, latency_tokens: int, latency_repeats: int
) -> PrunedModel:
    """:func:`save_pruned` for a HookedTransformer: the smaller HookedTransformer (see :func:`save_hooked`), and
    under ``out/hf`` the HF checkpoint it came from with the same neurons removed, when the model holds that
    checkpoint's raw weights."""
    pruned = apply_spec_hooked(model, spec)
    total0, mlp0 = hooked_parameters(model)
    total1, mlp1 = hooked_parameters(pruned)
    lat0 = forward_latency(model, latency_tokens, latency_repeats) if measure_latency else None
    lat1 = forward_latency(pruned, latency_tokens, latency_repeats) if measure_latency else None
    source = getattr(model, SOURCE_ATTR, None)
    with_hf = source is not None and Path(source, "config.json").is_file() and weight_source(model) == RAW
    with atomic_directory(out) as tmp:
        save_hooked(model, tmp / "dense")
        bytes0 = dir_size(tmp / "dense")
        shutil.rmtree(tmp / "dense")
        save_hooked(pruned, tmp)
        bytes1 = dir_size(tmp)
        if with_hf:
            # transformers costs about 0.5 s to import; imported only when an HF copy is written.
            from transformers import AutoModelForCausalLM, AutoTokenizer

            hf = AutoModelForCausalLM.from_pretrained(source, dtype=next(model.parameters()).dtype).eval()
            apply_spec(hf, spec).save_pretrained(tmp / "hf")
            AutoTokenizer.from_pretrained(source).save_pretrained(tmp / "hf")
    return pruned_result(
        spec,
        out,
        int(model.cfg.n_layers),
        int(pruned.cfg.d_mlp),
        (total0, mlp0, bytes0, lat0),
        (total1, mlp1, bytes1, lat1),
        latency_tokens,
        format="hooked",
        hf_out=str(out / "hf") if with_hf else None,
    )


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


def forward_latency(hf, n_tokens: int = 512, repeats: int = 5, vocab: Optional[int] = None) -> Tuple[float, float, float]:
    """(median, 25th, 75th percentile) wall time in seconds of a forward over ``n_tokens`` random tokens (one
    warm-up first); ``hf`` is a plain HF model or a HookedTransformer."""
    if hasattr(hf, "config"):
        vocab = vocab or int(hf.config.vocab_size)
        n_ctx = int(getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", n_tokens))
    else:
        vocab, n_ctx = vocab or int(hf.cfg.d_vocab), int(hf.cfg.n_ctx)
    ids = torch.randint(0, vocab, (1, min(n_tokens, n_ctx)), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        hf(ids)
        for _ in range(repeats):
            t = time.perf_counter()
            hf(ids)
            times.append(time.perf_counter() - t)
    q25, med, q75 = np.percentile(times, [25, 50, 75])
    return float(med), float(q25), float(q75)


def pruned_result(
    spec: PruneSpec, out: Path, n_layers: int, width: int, before: tuple, after: tuple, latency_tokens: int, **extra
) -> "PrunedModel":
    """The :class:`PrunedModel` of a saved spec; ``before`` / ``after``: (parameters, MLP parameters, weight-file
    bytes, :func:`forward_latency` or None) of the dense and the pruned model."""
    return PrunedModel(
        out=str(out),
        ablation=spec.ablation,
        compensated=bool(spec.delta_out),
        masked=padded(spec, n_layers),
        n_pruned=spec.n_pruned,
        d_mlp_before=spec.d_mlp,
        d_mlp_after=width,
        parameters_before=before[0],
        parameters_after=after[0],
        mlp_parameters_before=before[1],
        mlp_parameters_after=after[1],
        file_bytes_before=before[2],
        file_bytes_after=after[2],
        latency_tokens=latency_tokens,
        **latency_fields(before[3], after[3]),
        **extra,
    )


def latency_fields(before: Optional[Tuple[float, float, float]], after: Optional[Tuple[float, float, float]]) -> dict:
    """The latency fields of :class:`PrunedModel` from two :func:`forward_latency` results (None: not measured)."""
    if before is None or after is None:
        return {"latency_s_before": None, "latency_s_after": None}
    return {
        "latency_s_before": before[0],
        "latency_s_after": after[0],
        "latency_quartiles_s_before": before[1:],
        "latency_quartiles_s_after": after[1:],
    }


def dir_size(path: Union[str, Path]) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))


@dataclass
class PrunedModel(Result):
    """A saved pruned model and what changed.

    Attributes:
        out: the directory written (``save_pretrained`` with its tokenizer; loads in plain transformers).
        masked: True when the layers lost different numbers of neurons: every layer is stored at the widest
            layer's width, narrower layers padded with pruned neurons whose output weights are zero (exact; the
            saving is that of the widest layer, not of the average).
        d_mlp_before / d_mlp_after: MLP width before and after (after = the widest layer's when masked).
        parameters_before / parameters_after, mlp_parameters_before / mlp_parameters_after: unique counts.
        file_bytes_before / file_bytes_after: size of the weight files of the dense and pruned checkpoints.
        latency_s_before / latency_s_after: median CPU forward time over ``latency_tokens`` tokens, and
            latency_quartiles_s_before / latency_quartiles_s_after: the 25th and 75th percentiles (the spread).
        format: ``hf`` (a ``save_pretrained`` directory) or ``hooked`` (a HookedTransformer checkpoint:
            ``tl_config.json`` + ``model.safetensors`` + tokenizer, see :func:`load_hooked`).
        hf_out: for ``hooked``, the HF copy's directory (``out/hf``) when one was written, else None.
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
    latency_quartiles_s_before: Optional[Tuple[float, float]] = None
    latency_quartiles_s_after: Optional[Tuple[float, float]] = None
    format: str = "hf"
    hf_out: Optional[str] = None


def check_out_dir(out: Union[str, Path], overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory; give a new or empty directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"output directory {out} exists and is not empty; give a new or empty directory, or overwrite=True (--overwrite)."
        )
    return out


def save_pruned(
    model,
    spec: PruneSpec,
    out: Union[str, Path],
    overwrite: bool = False,
    measure_latency: bool = True,
    latency_tokens: int = 512,
    latency_repeats: int = 5,
) -> PrunedModel:
    """Apply ``spec`` to a fresh HF copy of ``model`` and ``save_pretrained`` it (with the tokenizer) into ``out``.

    The directory is written in a temporary sibling first and renamed into place, so a failure leaves no partial
    model behind.
    """
    latency_tokens = check_int(latency_tokens, "latency_tokens", 1)
    latency_repeats = check_int(latency_repeats, "latency_repeats", 1, 1000)
    out = check_out_dir(out, overwrite)
    if isinstance(arch_for(model), HookedArch):
        return save_pruned_hooked(model, spec, out, measure_latency, latency_tokens, latency_repeats)
    dense = fresh_hf_copy(model)
    total0, mlp0 = count_parameters(dense)
    lat0 = forward_latency(dense, latency_tokens, latency_repeats) if measure_latency else None
    with atomic_directory(out) as tmp:
        dense.save_pretrained(tmp / "dense")
        bytes0 = dir_size(tmp / "dense")
        shutil.rmtree(tmp / "dense")
        pruned = apply_spec(dense, spec)
        total1, mlp1 = count_parameters(pruned)
        lat1 = forward_latency(pruned, latency_tokens, latency_repeats) if measure_latency else None
        pruned.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        notice = arch_for(pruned).notice
        if notice:  # a licence that requires a notice beside modified copies (Gemma Terms of Use, 3.1)
            (tmp / "NOTICE").write_text(notice)
        bytes1 = dir_size(tmp)
    arch = arch_for(pruned)
    return pruned_result(
        spec,
        out,
        len(arch.decoder_layers(pruned)),
        arch.width(pruned.config),
        (total0, mlp0, bytes0, lat0),
        (total1, mlp1, bytes1, lat1),
        latency_tokens,
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


def make_spec(
    model,
    neurons,
    ablation: str = "zero",
    means: Optional[Dict[int, Tensor]] = None,
    grams: Optional[Dict[int, Tensor]] = None,
    damp: Union[float, Dict[int, float]] = DEFAULT_DAMP,
    w_out: Optional[Tensor] = None,
) -> PruneSpec:
    """Build a :class:`PruneSpec` from validated neurons.

    ``ablation='mean'`` needs ``means`` ({layer: [d_mlp]}); a least-squares refit happens when ``grams`` (from
    :func:`~neuronscope_tl.activations.activation_grams`) is given, with an output bias when ``ablation='mean'``,
    damped by ``damp`` (one value, or one per layer; see :func:`~neuronscope_tl.obs.refit_output`). ``w_out`` is
    the model's ``W_out`` [L, d_mlp, d_model] when the caller already holds it (read from the model otherwise).
    """
    check_ablation(ablation)
    neurons = check_neuron_sets(model, neurons)
    d_mlp = mlp_info(model).d_mlp
    spec = PruneSpec(neurons=neurons, d_mlp=d_mlp, ablation=ablation)
    arch = arch_for(model)
    w_out_all = output_matrix(model) if w_out is None else w_out  # [L, d_mlp, d_model]
    for layer, pruned in neurons.items():
        w_out = w_out_all[layer]
        if grams is not None:
            layer_damp = damp[layer] if isinstance(damp, dict) else damp
            delta, bias = refit_output(grams[layer], w_out, pruned, with_bias=ablation == "mean", damp=layer_damp)
            spec.delta_out[layer] = delta
            spec.out_hooks[layer] = arch.mlp_out_hook(layer)
            if bias is not None:
                spec.bias[layer] = bias
        elif ablation == "mean":
            if means is None:
                raise ValueError("mean ablation needs each neuron's mean activation (means={layer: [d_mlp]}).")
            values = means[layer].float()[torch.tensor(pruned)]
            spec.replacement[layer] = values
            spec.bias[layer] = values @ w_out[pruned]
    return spec


def simulation_hooks(spec: PruneSpec, differentiable: bool = False) -> list:
    """Hooks that simulate ``spec`` on the bridge, for use with :func:`attached_hooks`.

    Pruned neurons are ablated on ``mlp.hook_post`` through the core's :func:`make_plan`/:func:`ablation_hooks`
    (zero, or the mean activations); a refit adds ``a_ablated @ delta + bias`` on the hook point right after the
    MLP's output projection (``spec.out_hooks``; ``mlp.hook_out`` when absent). The refit's term reads the
    activations detached unless ``differentiable``: then gradients flow back through it into the layers before
    (what training the spec's own tensors needs, :mod:`~neuronscope_tl.distill`).
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
        hooks.append((mlp_post_name(layer), capture_hook(store, str(layer), detach=not differentiable)))
        out_hook = spec.out_hooks.get(layer, f"blocks.{layer}.mlp.hook_out")
        hooks.append((out_hook, _refit_hook(store, str(layer), delta, spec.bias.get(layer))))
    return hooks


def _refit_hook(store: dict, key: str, delta: Tensor, bias: Optional[Tensor]):
    def hook(out: Tensor, hook=None) -> Tensor:
        a = store.pop(key)
        extra = a @ delta.to(device=a.device, dtype=a.dtype)
        if bias is not None:
            extra = extra + bias.to(device=a.device, dtype=a.dtype)
        return out + extra.to(out.dtype)

    return hook


def prune_model(
    model,
    neurons,
    ablation: str = "zero",
    out: Optional[Union[str, Path]] = None,
    compensate: bool = False,
    calib_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    overwrite: bool = False,
    measure_latency: bool = True,
    spec: Optional[PruneSpec] = None,
):
    """Remove ``neurons`` from ``model`` physically.

    Args:
        neurons: {layer: [neuron]}, (layer, neuron) pairs, or a DataFrame with layer/neuron columns.
        ablation: ``zero`` or ``mean`` (mean activation folded into the output bias).
        out: directory to ``save_pretrained`` into; None returns the in-memory HF model without saving.
        compensate: least-squares refit of the kept output weights on ``calib_tokens`` calibration tokens.
        calib_texts: calibration texts (default: the Lee calibration split).
        spec: a prebuilt :class:`PruneSpec` (as :func:`prune_curve` makes); overrides the other arguments.

    Returns a :class:`PrunedModel` (when ``out`` is given) or the pruned model: a plain HF model for a bridge, a
    smaller HookedTransformer for a HookedTransformer.
    """
    check_ablation(ablation)
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    if out is not None:
        check_out_dir(out, overwrite)
    if spec is None:
        chosen = check_neuron_sets(model, neurons)
        texts = list(calib_texts) if calib_texts is not None else calibration_texts()
        grams = activations.activation_grams(model, texts, sorted(chosen), calib_tokens) if compensate else None
        means = (
            ablation_values(model, sorted(chosen), ablation, texts, calib_tokens)
            if ablation == "mean" and not compensate
            else None
        )
        spec = make_spec(model, chosen, ablation, means, grams)
    if out is None:
        if isinstance(arch_for(model), HookedArch):
            return apply_spec_hooked(model, spec)
        return apply_spec(fresh_hf_copy(model), spec)
    return save_pruned(model, spec, out, overwrite=overwrite, measure_latency=measure_latency)
