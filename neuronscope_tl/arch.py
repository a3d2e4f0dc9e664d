"""Model-kind adapters: everything neuronscope_tl needs to know that differs between the kinds of model it reads.

A *model kind* is a TransformerLens model class together with, for a ``TransformerBridge``, the family of the
Hugging Face model it wraps. Each kind has one :class:`Arch` adapter. What every adapter answers, on the
TransformerLens model (``model``):

* the stacked MLP weights in the TransformerLens conventions, ``W_in``/``W_gate`` [L, d_model, d_mlp] and
  ``W_out`` [L, d_mlp, d_model] (:meth:`~Arch.mlp_weights`, :meth:`~Arch.output_matrix`,
  :meth:`~Arch.mlp_input_bias`), and whether those are the checkpoint's raw weights or TransformerLens-processed
  ones (:meth:`~Arch.weight_source`);
* the model's own parameters, each storage once (:meth:`~Arch.parameters`);
* the tail of the model from a given block on, for exact ablation (:meth:`~Arch.tail`);
* the hook point right after the MLP's output projection (:meth:`~Arch.mlp_out_hook`).

Hugging Face families also answer, for the HF module tree (``hf``, a plain HF model or a bridge's wrapped one):
where the parts are (:meth:`~Arch.decoder_layers`, :meth:`~Arch.final_norm`, :meth:`~Arch.unembed`,
:meth:`~Arch.rotary`, :meth:`~Arch.mlp`), how the HF model calls its decoder layers (:meth:`~Arch.run_layers`), and
how an MLP is narrowed (:meth:`~Arch.output_weights`, :meth:`~Arch.shrink_mlp`, :attr:`~Arch.width_key`,
:meth:`~Arch.width`, :meth:`~Arch.set_width`).

Kinds:

* :class:`HookedArch`: a TransformerLens 3.x ``HookedTransformer`` (standard or gated MLPs; removed in
  TransformerLens 4). Its weights are TransformerLens's own tensors: ``from_pretrained`` folds the norms into
  ``W_in`` and centres the writing weights (*processed*), ``from_pretrained_no_processing`` keeps the checkpoint's
  numbers (*raw*). The tail runs ``model.blocks[k:]``, ``ln_final`` and ``unembed``.
* :class:`Gemma3Arch`: Gemma 3 text decoders (``Gemma3ForCausalLM``): gated GELU-tanh MLPs with the Llama part
  names, four norms per block, sliding-window and global attention layers with their own rotary tables, and an
  optional final logit soft-cap. Its MLPs cannot carry an output bias (``Gemma3MLP`` builds its projections with
  ``bias=False`` whatever the config says), so a pruned Gemma 3 model can only drop neurons (zero ablation, with
  or without a bias-free least-squares refit).
* :class:`LlamaArch`, gated MLPs with ``gate_proj``/``up_proj``/``down_proj`` ``Linear`` layers under
  ``model.layers`` (Llama, Mistral, Qwen, SmolLM2). Narrowing removes rows of ``gate_proj``/``up_proj`` and columns
  of ``down_proj``; an output bias needs ``mlp_bias=True`` in the config, which also gives gate and up a bias
  (set to zero).
* :class:`GPT2Arch`, ``Conv1D`` MLPs with ``c_fc``/``c_proj`` under ``transformer.h`` (GPT-2). Narrowing removes
  columns of ``c_fc`` (and its bias entries) and rows of ``c_proj``; an extra output bias is added to
  ``c_proj.bias``.

For a bridge, the MLP weights are read from the wrapped HF modules themselves (``up_proj.weight.T`` and so on, as
TransformerLens's own weight conversions define ``W_in``/``W_gate``/``W_out``), not from the bridge's stacked
properties: those have come back transposed for ``nn.Linear`` models in some TransformerLens releases.

:func:`arch_for` picks the adapter: the adapters in :data:`ADAPTERS` are asked in order and the first whose
:meth:`~Arch.matches` accepts the model is used, so a more specific kind goes before a more general one it
resembles (Gemma 3 before Llama). A TransformerLens model must also expose ``blocks.{l}.mlp.hook_post`` for every
layer, ``d_mlp`` wide (for a bridge this is checked once per model with a one-token forward): every analysis
reads and ablates neurons there. Any other model is refused with a ValueError that names the supported kinds.

:func:`clean_state_dict` gives the HF model's own tensors under the names a freshly built HF model of the same
config uses (the bridge's wrappers add ``._original_component`` to every name, alias views such as ``mlp.in`` and
synthetic buffers such as a zero unembedding bias).

References: TransformerLens's ``pretrained/weight_conversions`` (3.x) for the ``W_in``/``W_gate``/``W_out``
conventions and ``HookedTransformer.load_and_process_state_dict`` for what processing does; transformers'
``modeling_llama``, ``modeling_gpt2`` and ``modeling_gemma3`` for how each family calls its decoder layers.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

Module = torch.nn.Module

FP32_EPS = float(torch.finfo(torch.float32).eps)

RAW = "raw"
PROCESSED = "processed"
WEIGHT_SOURCES = (RAW, PROCESSED)

# Set on a HookedTransformer by neuronscope_tl.models.load_model: which weights it holds ("raw" or "processed")
# and the directory of the Hugging Face checkpoint it was converted from.
WEIGHTS_ATTR = "neuronscope_weights"
SOURCE_ATTR = "neuronscope_source"


def hf_model(model: Module) -> Module:
    """The Hugging Face model of a ``TransformerBridge`` (its ``original_model``), or ``model`` itself."""
    return getattr(model, "original_model", model)


def is_hooked_transformer(model: Any) -> bool:
    """True for a TransformerLens ``HookedTransformer`` (or a subclass). Checked by class name so that this module
    imports on TransformerLens 4, which has no such class."""
    return any(c.__name__ == "HookedTransformer" and c.__module__.startswith("transformer_lens") for c in type(model).__mro__)


def is_transformer_lens_model(model: Any) -> bool:
    """True for a TransformerLens model with hook points (a bridge or a HookedTransformer), False for plain HF."""
    return hasattr(model, "hook_dict") and hasattr(model, "cfg")


def _linear(weight: Tensor, bias: Optional[Tensor]) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    lin.weight = torch.nn.Parameter(weight.contiguous())
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.contiguous())
    return lin


def _f32(t: Tensor) -> Tensor:
    return t.detach().float().cpu()


def unique_storages(params) -> List[Tensor]:
    """Tensors each storage counted once: tied matrices share one storage, and views (GPT-2's fused ``c_attn``
    exposed as q/k/v views by the bridge) share their base's; for each storage the largest tensor is kept."""
    groups: Dict[int, Tensor] = {}
    for p in params:
        key = p.untyped_storage().data_ptr()
        if key not in groups or p.numel() > groups[key].numel():
            groups[key] = p
    return list(groups.values())


@dataclass
class Tail:
    """The model from block ``start`` on: ``run(hidden, start)`` runs blocks start..L-1 on the residual stream
    [batch, pos, d_model] (unpadded, positions 0..pos-1) with the hook points inside them firing; ``norm`` and
    ``head`` turn the last residual into logits."""

    run: Callable[[Tensor, int], Tensor]
    norm: Module
    head: Module


class SoftCappedHead(Module):
    """An unembedding followed by tanh soft-capping of the logits, ``cap * tanh(logits / cap)`` (Gemma 2/3's
    ``final_logit_softcapping``), as the HF model applies it after its ``lm_head``."""

    def __init__(self, head: Module, cap: float):
        super().__init__()
        self.head, self.cap = head, float(cap)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.head(x) / self.cap) * self.cap


class Arch:
    """The adapter of one model kind. Methods taking ``hf`` read the Hugging Face module tree (a plain HF model
    or a bridge's wrapped one); methods taking ``model`` read the TransformerLens model.

    Attributes:
        name: short name of the kind.
        description: what the kind's models look like, for error messages.
        width_key: the config field holding the MLP width (HF families).
        gated_mlp: whether the family's MLPs are gated; None when only the weights can tell.
        tree: for HF families, (body, decoder layers, final norm) attribute names: the layers are
            ``hf.<body>.<layers>`` and the norm ``hf.<body>.<norm>``.
        mlp_parts: for HF families, the projections every MLP has.
    """

    name: str = ""
    description: str = ""
    width_key: str = ""
    gated_mlp: Optional[bool] = None
    tree: Tuple[str, str, str] = ("", "", "")
    mlp_parts: Tuple[str, ...] = ()
    # A NOTICE file the model's licence requires beside every copy of a modified model, or None.
    notice: Optional[str] = None

    def matches(self, model: Module) -> bool:
        """True when ``model`` (a bridge or an HF model) belongs to this family: an HF causal LM with ``lm_head``,
        the family's module tree and MLP projections."""
        hf = hf_model(model)
        body_name, layers_name, norm_name = self.tree
        body = getattr(hf, body_name, None)
        layers = getattr(body, layers_name, None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0 or not hasattr(body, norm_name):
            return False
        mlp = getattr(layers[0], "mlp", None)
        return hasattr(hf, "lm_head") and all(hasattr(mlp, part) for part in self.mlp_parts)

    # ------------------------------------------------------------------------------------------ module tree

    def decoder_layers(self, hf: Module) -> torch.nn.ModuleList:
        """The decoder layers, in order."""
        return getattr(getattr(hf, self.tree[0]), self.tree[1])

    def final_norm(self, hf: Module) -> Module:
        """The norm applied to the residual stream after the last decoder layer."""
        return getattr(getattr(hf, self.tree[0]), self.tree[2])

    def unembed(self, hf: Module) -> Module:
        """The unembedding (language-model head), with the logit soft-cap when the config has one."""
        cap = getattr(hf.config, "final_logit_softcapping", None)
        return SoftCappedHead(hf.lm_head, cap) if cap else hf.lm_head

    def rotary(self, hf: Module) -> Optional[Module]:
        """The rotary position embedding module, or None for learned absolute positions."""
        return None

    def mlp(self, hf: Module, layer: int) -> Module:
        """The MLP module of decoder layer ``layer``."""
        return self.decoder_layers(hf)[layer].mlp

    def run_layers(self, hf: Module, hidden: Tensor, start: int) -> Tensor:
        """Decoder layers ``start``..L-1 on ``hidden`` [batch, pos, d_model] (unpadded, positions 0..pos-1), called
        as the HF model calls them: with its causal mask and, for rotary models, its position embeddings."""
        # transformers.masking_utils imports torch._dynamo (about 2 s); importing it with the package would slow
        # every `import neuronscope_tl`, so it is imported when a tail is first run.
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = create_causal_mask(config=hf.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=pos)
        kwargs: Dict[str, Any] = {"attention_mask": mask, "position_ids": pos, "use_cache": False}
        rotary = self.rotary(hf)
        if rotary is not None:
            kwargs["position_embeddings"] = rotary(hidden, position_ids=pos)
        for layer in self.decoder_layers(hf)[start:]:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    # ------------------------------------------------------------------------------------------ HF MLP weights

    def output_weights(self, hf: Module, layer: int) -> Tensor:
        """[d_mlp, d_model] output weights of one MLP (the ``W_out`` convention), fp32 copy."""
        raise NotImplementedError

    def input_weights(self, hf: Module, layer: int) -> Dict[str, Tensor]:
        """``in`` (and ``gate`` for gated MLPs) [d_model, d_mlp] input weights of one MLP (the ``W_in``/``W_gate``
        convention), fp32 copies."""
        raise NotImplementedError

    def input_bias(self, hf: Module, layer: int) -> Optional[Tensor]:
        """[d_mlp] input bias of one MLP (``b_in``), or None when its input projection has no bias."""
        return None

    def shrink_mlp(self, mlp: Module, keep: Tensor, w_out: Tensor, extra_bias: Optional[Tensor], need_bias: bool) -> None:
        """Narrow ``mlp`` in place to the neurons ``keep``, with output weights ``w_out[keep]`` ([d_mlp, d_model],
        the ``W_out`` convention) and ``extra_bias`` [d_model] (or None) added to the output bias. ``need_bias``:
        the pruned model carries an output bias (some layer has an extra bias)."""
        raise NotImplementedError

    def width(self, config: Any) -> int:
        """The MLP width a config gives."""
        return int(getattr(config, self.width_key))

    def set_width(self, config: Any, width: int, need_bias: bool) -> None:
        """Write the MLP width (and, if ``need_bias``, that the MLP output has a bias) into ``config``."""
        setattr(config, self.width_key, width)

    # ------------------------------------------------------------------------------------------ TransformerLens views

    def mlp_weights(self, model: Module) -> Dict[str, Tensor]:
        """MLP matrices, detached fp32 on CPU: ``in``/``gate`` [L, d_model, d_mlp], ``out`` [L, d_mlp, d_model]
        (``gate`` only for gated MLPs). For a bridge, read from the wrapped HF modules."""
        hf = hf_model(model)
        n = len(self.decoder_layers(hf))
        ins = [self.input_weights(hf, l) for l in range(n)]
        out = {key: torch.stack([w[key] for w in ins]) for key in ins[0]}
        out["out"] = torch.stack([self.output_weights(hf, l) for l in range(n)])
        return out

    def output_matrix(self, model: Module) -> Tensor:
        """``W_out`` [L, d_mlp, d_model], detached fp32 on CPU."""
        hf = hf_model(model)
        return torch.stack([self.output_weights(hf, l) for l in range(len(self.decoder_layers(hf)))])

    def mlp_input_bias(self, model: Module) -> Optional[Tensor]:
        """``b_in`` [L, d_mlp] when the MLP has an input bias, else None."""
        hf = hf_model(model)
        biases = [self.input_bias(hf, l) for l in range(len(self.decoder_layers(hf)))]
        return None if any(b is None for b in biases) else torch.stack(biases)

    def gated(self, model: Module) -> bool:
        """True for gated MLPs (a ``W_gate``): the family's ``gated_mlp`` when it says, else read from the weights."""
        if self.gated_mlp is not None:
            return self.gated_mlp
        return "gate" in self.input_weights(hf_model(model), 0)

    def parameters(self, model: Module) -> List[Tensor]:
        """The model's parameters, each storage once: for a bridge, its wrapped HF model's parameters under the
        names a fresh HF model of the same config has (the checkpoint's tensors; tied matrices counted once). The
        bridge's own additions (alias views, and in some TransformerLens releases a synthetic unembedding bias
        registered as a parameter) are left out."""
        hf = hf_model(model)
        with torch.device("meta"):
            want = {n for n, _ in type(hf)(copy.deepcopy(hf.config)).named_parameters(remove_duplicate=False)}
        named = hf.named_parameters(remove_duplicate=False)
        return unique_storages(p for n, p in named if n.replace("._original_component", "") in want)

    def weight_source(self, model: Module) -> str:
        """``raw`` (the checkpoint's own numbers) or ``processed`` (TransformerLens folded norms or centred
        weights). A bridge is booted on the HF model's weights, so always ``raw``."""
        return RAW

    def tail(self, model: Module) -> Tail:
        """The model's tail (see :class:`Tail`); for a bridge, the wrapped HF model's own decoder layers, which the
        bridge has wrapped in place so that its hook points fire."""
        hf = hf_model(model)
        return Tail(lambda hidden, start: self.run_layers(hf, hidden, start), self.final_norm(hf), self.unembed(hf))

    def mlp_out_hook(self, layer: int) -> str:
        """The hook point on the MLP's output right after its output projection, [batch, pos, d_model]."""
        return f"blocks.{layer}.mlp.hook_out"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LlamaArch(Arch):
    """Gated MLPs (``gate_proj``/``up_proj``/``down_proj``) under ``model.layers``: Llama, Mistral, Qwen, SmolLM2."""

    gated_mlp = True

    name = "llama"
    description = "Llama-style decoders (model.layers with gate_proj/up_proj/down_proj MLPs: Llama, Mistral, Qwen, SmolLM2)"
    width_key = "intermediate_size"
    tree = ("model", "layers", "norm")
    mlp_parts = ("gate_proj", "up_proj", "down_proj")

    def rotary(self, hf: Module) -> Optional[Module]:
        return getattr(hf.model, "rotary_emb", None)

    def output_weights(self, hf: Module, layer: int) -> Tensor:
        return self.mlp(hf, layer).down_proj.weight.detach().float().t().clone()

    def input_weights(self, hf: Module, layer: int) -> Dict[str, Tensor]:
        mlp = self.mlp(hf, layer)
        return {"in": _f32(mlp.up_proj.weight).t().clone(), "gate": _f32(mlp.gate_proj.weight).t().clone()}

    def input_bias(self, hf: Module, layer: int) -> Optional[Tensor]:
        bias = self.mlp(hf, layer).up_proj.bias
        return None if bias is None else _f32(bias).clone()

    def shrink_mlp(self, mlp: Module, keep: Tensor, w_out: Tensor, extra_bias: Optional[Tensor], need_bias: bool) -> None:
        dtype = mlp.down_proj.weight.dtype
        zeros = (lambda n: torch.zeros(n, dtype=dtype)) if need_bias else (lambda n: None)
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            b = old.bias[keep].detach().clone() if old.bias is not None else zeros(len(keep))
            setattr(mlp, name, _linear(old.weight[keep].detach().clone(), b))
        d_model = w_out.shape[1]
        old_b = mlp.down_proj.bias.detach().clone() if mlp.down_proj.bias is not None else zeros(d_model)
        if extra_bias is not None:
            old_b = old_b + extra_bias.to(dtype)
        mlp.down_proj = _linear(w_out[keep].t().to(dtype), old_b)

    def set_width(self, config: Any, width: int, need_bias: bool) -> None:
        config.intermediate_size = width
        if need_bias:
            config.mlp_bias = True


class Gemma3Arch(LlamaArch):
    """Gemma 3 text decoders (``Gemma3ForCausalLM``, config ``model_type`` ``gemma3_text``): Llama part names, but
    GELU-tanh gates, four norms per block, per-layer attention types (sliding window or global, each with its own
    mask and rotary table), a scaled embedding and an optional final logit soft-cap. No MLP output bias."""

    name = "gemma3"
    description = "Gemma 3 text decoders (Gemma3ForCausalLM: gated GELU-tanh MLPs, sliding-window and global layers)"
    # Gemma Terms of Use, section 3.1: every Distribution of Gemma or a Model Derivative (a pruned model is one)
    # carries this notice in a "Notice" text file, and modified files say that they were modified.
    notice = (
        "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n\n"
        "Modified: MLP neurons were removed from this model (its weight files differ from the original Gemma 3 "
        "checkpoint) by neuronscope-tl. Use is subject to the use restrictions of section 3.2 of the Gemma Terms of "
        "Use and the Gemma Prohibited Use Policy (ai.google.dev/gemma/prohibited_use_policy).\n"
    )

    def matches(self, model: Module) -> bool:
        hf = hf_model(model)
        return getattr(getattr(hf, "config", None), "model_type", None) == "gemma3_text" and super().matches(model)

    def run_layers(self, hf: Module, hidden: Tensor, start: int) -> Tensor:
        """As ``Gemma3TextModel.forward``: each layer gets the mask and rotary table of its attention type."""
        # transformers.masking_utils imports torch._dynamo (about 2 s): imported when a tail is first run.
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        cfg = hf.config
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask_kwargs = dict(config=cfg, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=pos)
        masks = {
            "full_attention": create_causal_mask(**mask_kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs),
        }
        rotary = hf.model.rotary_emb
        tables = {t: rotary(hidden, pos, t) for t in set(cfg.layer_types)}
        for i in range(start, len(self.decoder_layers(hf))):
            kind = cfg.layer_types[i]
            out = self.decoder_layers(hf)[i](
                hidden, attention_mask=masks[kind], position_embeddings=tables[kind], position_ids=pos
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def shrink_mlp(self, mlp: Module, keep: Tensor, w_out: Tensor, extra_bias: Optional[Tensor], need_bias: bool) -> None:
        if need_bias or extra_bias is not None:
            raise ValueError(
                "Gemma 3 MLPs have no output bias (Gemma3MLP builds its projections with bias=False), so a pruned "
                "Gemma 3 model cannot carry mean ablation or a biased refit; use ablation='zero' (optionally with a "
                "least-squares refit of the kept output weights)."
            )
        super().shrink_mlp(mlp, keep, w_out, None, False)

    def set_width(self, config: Any, width: int, need_bias: bool) -> None:
        config.intermediate_size = width


class GPT2Arch(Arch):
    """``Conv1D`` MLPs (``c_fc``/``c_proj``, weights stored [in, out]) under ``transformer.h``: GPT-2."""

    gated_mlp = False

    name = "gpt2"
    description = "GPT-2-style decoders (transformer.h with Conv1D c_fc/c_proj MLPs)"
    width_key = "n_inner"
    tree = ("transformer", "h", "ln_f")
    mlp_parts = ("c_fc", "c_proj")

    def output_weights(self, hf: Module, layer: int) -> Tensor:
        return self.mlp(hf, layer).c_proj.weight.detach().float().clone()

    def input_weights(self, hf: Module, layer: int) -> Dict[str, Tensor]:
        return {"in": _f32(self.mlp(hf, layer).c_fc.weight).clone()}

    def input_bias(self, hf: Module, layer: int) -> Optional[Tensor]:
        return _f32(self.mlp(hf, layer).c_fc.bias).clone()

    def shrink_mlp(self, mlp: Module, keep: Tensor, w_out: Tensor, extra_bias: Optional[Tensor], need_bias: bool) -> None:
        # transformers costs about 0.5 s to import; it is imported when a model is first narrowed, not with the package.
        from transformers.pytorch_utils import Conv1D

        dtype = mlp.c_proj.weight.dtype
        fc = Conv1D(len(keep), mlp.c_fc.weight.shape[0])
        fc.weight = torch.nn.Parameter(mlp.c_fc.weight[:, keep].detach().clone())
        fc.bias = torch.nn.Parameter(mlp.c_fc.bias[keep].detach().clone())
        proj = Conv1D(w_out.shape[1], len(keep))
        proj.weight = torch.nn.Parameter(w_out[keep].to(dtype).contiguous())
        b = mlp.c_proj.bias.detach().clone()
        if extra_bias is not None:
            b = b + extra_bias.to(dtype)
        proj.bias = torch.nn.Parameter(b)
        mlp.c_fc, mlp.c_proj = fc, proj

    def width(self, config: Any) -> int:
        """``n_inner``, or GPT-2's default of 4 x ``n_embd`` when the config leaves it unset."""
        return int(config.n_inner if config.n_inner is not None else 4 * config.n_embd)


class HookedArch(Arch):
    """A TransformerLens 3.x ``HookedTransformer`` with dense MLPs (``MLP`` or ``GatedMLP``: ``blocks.{l}.mlp`` with
    ``W_in`` [d_model, d_mlp], ``W_out`` [d_mlp, d_model] and ``hook_post`` on the activations). Weights are the
    model's own; there is no HF module tree (:func:`neuronscope_tl.models.load_model` records the checkpoint a
    model was converted from, for exporting an HF copy)."""

    name = "hooked"
    description = "TransformerLens 3.x HookedTransformer with dense MLPs (blocks.{l}.mlp.W_in/W_out and hook_post)"

    def matches(self, model: Module) -> bool:
        if not is_hooked_transformer(model) or getattr(model.cfg, "num_experts", None):
            return False
        blocks = getattr(model, "blocks", None)
        mlps = [getattr(b, "mlp", None) for b in blocks or ()]
        return bool(mlps) and all(hasattr(m, "hook_post") and hasattr(m, "W_in") and hasattr(m, "W_out") for m in mlps)

    def _no_hf(self, *args, **kwargs):
        raise ValueError(
            "a HookedTransformer has no Hugging Face module tree; load the checkpoint with transformers (or "
            "neuronscope_tl.load_model) for Hugging Face surgery."
        )

    decoder_layers = final_norm = output_weights = input_weights = shrink_mlp = run_layers = _no_hf  # type: ignore

    def mlp_weights(self, model: Module) -> Dict[str, Tensor]:
        out = {"in": _f32(model.W_in), "out": _f32(model.W_out)}
        if model.cfg.gated_mlp:
            out["gate"] = _f32(model.W_gate)
        return out

    def output_matrix(self, model: Module) -> Tensor:
        return _f32(model.W_out)

    def mlp_input_bias(self, model: Module) -> Optional[Tensor]:
        return _f32(model.b_in)

    def gated(self, model: Module) -> bool:
        return bool(model.cfg.gated_mlp)

    def parameters(self, model: Module) -> List[Tensor]:
        return unique_storages(model.parameters())

    def weight_source(self, model: Module) -> str:
        """What :func:`neuronscope_tl.models.load_model` recorded; otherwise ``processed`` when the norms are folded
        (``normalization_type`` LNPre/RMSPre) or the writing weights are centred (every row of ``W_E`` and of each
        ``W_out`` has mean 0 over d_model, up to fp32 rounding: 4 eps max|w| per row), else ``raw``."""
        recorded = getattr(model, WEIGHTS_ATTR, None)
        if recorded in WEIGHT_SOURCES:
            return recorded
        if str(model.cfg.normalization_type) in ("LNPre", "RMSPre"):
            return PROCESSED
        with torch.no_grad():
            mats = [model.W_E.detach()] + [b.mlp.W_out.detach() for b in model.blocks]
            centred = all(bool((m.double().mean(-1).abs() <= 4 * FP32_EPS * m.double().abs().amax(-1)).all()) for m in mats)
        return PROCESSED if centred else RAW

    def tail(self, model: Module) -> Tail:
        def run(hidden: Tensor, start: int) -> Tensor:
            for block in model.blocks[start:]:
                hidden = block(hidden)
            return hidden

        return Tail(run, model.ln_final, model.unembed)

    def mlp_out_hook(self, layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"


# Asked in order by arch_for: a more specific kind must come before a more general one it resembles.
ADAPTERS: List[Arch] = [HookedArch(), Gemma3Arch(), LlamaArch(), GPT2Arch()]

# Models whose hook points have been checked, with their adapter (a one-token forward per bridge).
_CHECKED: "weakref.WeakKeyDictionary[Module, Arch]" = weakref.WeakKeyDictionary()


def supported_kinds() -> str:
    """The supported kinds, for messages."""
    return "; ".join(a.description for a in ADAPTERS)


def _refuse(model: Module, why: str) -> ValueError:
    kind = type(model).__name__
    if kind == "TransformerBridge" or not is_transformer_lens_model(model):
        kind = type(hf_model(model)).__name__
    return ValueError(f"{kind} is not a supported model kind ({why}); supported: {supported_kinds()}.")


def check_hook_post(model: Module, arch: Arch) -> None:
    """Every layer's ``blocks.{l}.mlp.hook_post`` exists and is ``d_mlp`` wide; ValueError otherwise.

    A HookedTransformer's MLP applies ``hook_post`` to the input of its own ``W_out``, so its width is that of
    ``W_out``. A bridge maps the hook onto the wrapped model's modules, so it is measured with a one-token forward.
    """
    cfg = model.cfg
    n_layers, d_mlp = int(cfg.n_layers), getattr(cfg, "d_mlp", None)
    if not d_mlp:
        raise _refuse(model, "its config has no MLP width d_mlp")
    names = [f"blocks.{l}.mlp.hook_post" for l in range(n_layers)]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise _refuse(model, f"no hook point {missing[0]}")
    if isinstance(arch, HookedArch):
        widths = {int(b.mlp.W_out.shape[0]) for b in model.blocks}
    else:
        seen: Dict[str, int] = {}

        def record(name: str):
            def hook(act: Tensor, hook=None) -> None:  # the bridge names aliased hook points by their target
                seen[name] = int(act.shape[-1])

            return hook

        token = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad(), model.hooks(fwd_hooks=[(n, record(n)) for n in names]):
            model(token, return_type=None)
        if set(seen) != set(names):
            raise _refuse(model, f"hook points that never fire: {sorted(set(names) - set(seen))[:3]}")
        widths = set(seen.values())
    if widths != {int(d_mlp)}:
        raise _refuse(model, f"mlp.hook_post is {sorted(widths)} wide, not d_mlp={int(d_mlp)}")


def arch_for(model: Module) -> Arch:
    """The adapter of a TransformerLens model (a ``TransformerBridge`` or a ``HookedTransformer``) or of a plain
    Hugging Face model.

    Raises ValueError naming the supported kinds when no adapter accepts the model (an encoder, a decoder whose
    MLP has no supported form) or, for a TransformerLens model, when its ``mlp.hook_post`` is missing or not
    ``d_mlp`` wide. A TransformerLens model is checked once; the answer is remembered for that object.
    """
    tl = is_transformer_lens_model(model)
    if tl:
        try:
            return _CHECKED[model]
        except (KeyError, TypeError):
            pass
    for arch in ADAPTERS:
        if arch.matches(model):
            if tl:
                check_hook_post(model, arch)
                _CHECKED[model] = arch
            return arch
    raise _refuse(model, "no adapter recognises it")


def clean_state_dict(model: Module) -> Dict[str, Tensor]:
    """The HF model's parameters and persistent buffers (detached, not copied) under the names a freshly built HF
    model of the same class and config uses, in state-dict order.

    ``model`` is a bridge or a plain HF model. The bridge's names lose ``._original_component``; where several
    bridge names clean to the same HF name, the first one is kept; names a fresh HF model does not have (the
    bridge's alias views and synthetic buffers) are left out. The fresh model is built on the meta device only
    for its names: no memory, no random initialisation.
    """
    hf = hf_model(model)
    with torch.device("meta"):
        want = set(type(hf)(copy.deepcopy(hf.config)).state_dict())
    state: Dict[str, Tensor] = {}
    for key, value in hf.state_dict().items():
        clean = key.replace("._original_component", "")
        if clean in want and clean not in state:
            state[clean] = value.detach()
    return state


def mlp_weights(model: Module) -> Dict[str, Tensor]:
    """MLP matrices of a TransformerLens model, detached fp32 on CPU: ``in``/``gate`` [L, d_model, d_mlp],
    ``out`` [L, d_mlp, d_model] (``gate`` only for gated MLPs)."""
    return arch_for(model).mlp_weights(model)


def output_matrix(model: Module) -> Tensor:
    """``W_out`` [L, d_mlp, d_model] of a TransformerLens model, detached fp32 on CPU."""
    return arch_for(model).output_matrix(model)


def mlp_input_bias(model: Module) -> Optional[Tensor]:
    """``b_in`` [L, d_mlp] of a TransformerLens model when the MLP has an input bias, else None."""
    return arch_for(model).mlp_input_bias(model)


def weight_source(model: Module) -> str:
    """``raw`` or ``processed``: which weights a TransformerLens model holds (see :meth:`Arch.weight_source`)."""
    return arch_for(model).weight_source(model)


def check_weight_source(model: Module, weights: str) -> str:
    """The weights a statistic is taken on: ``weights`` is ``auto`` (the model's own), ``raw`` or ``processed``.

    ValueError when the model holds other weights than asked for, saying how to load it instead: raw statistics of
    a HookedTransformer loaded with processing (``from_pretrained``) cannot be recovered from it, since folding
    and centring are not invertible.
    """
    if weights not in ("auto",) + WEIGHT_SOURCES:
        raise ValueError(f"weights must be one of 'auto', 'raw', 'processed', got {weights!r}.")
    have = weight_source(model)
    if weights == "auto" or weights == have:
        return have
    if weights == RAW:
        raise ValueError(
            "this HookedTransformer holds processed weights (TransformerLens folded the norms into W_in and/or "
            "centred the writing weights), so raw-weight statistics cannot be taken on it. Load it with "
            "HookedTransformer.from_pretrained_no_processing(...) or neuronscope_tl.load_model(name, "
            "kind='hooked') (raw by default), or use a TransformerBridge, which always holds the raw weights."
        )
    raise ValueError(
        "this model holds its raw checkpoint weights; for processed-weight statistics load it with "
        "HookedTransformer.from_pretrained(...) or neuronscope_tl.load_model(name, kind='hooked', processed=True)."
    )


def parameters(model: Module) -> List[Tensor]:
    """A TransformerLens model's parameters, each storage once (see :meth:`Arch.parameters`)."""
    return arch_for(model).parameters(model)
