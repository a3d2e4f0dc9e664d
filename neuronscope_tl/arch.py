"""Model-family adapters: everything neuronscope_tl needs to know that differs between model families.

Each supported family has one :class:`Arch` adapter that answers, for its Hugging Face module tree:

* where the parts are: :meth:`~Arch.decoder_layers`, :meth:`~Arch.final_norm`, :meth:`~Arch.unembed`,
  :meth:`~Arch.rotary`, :meth:`~Arch.mlp`;
* how the HF model calls its decoder layers (:meth:`~Arch.run_layers`, which runs a tail of them);
* the MLP output weights in the TransformerLens ``W_out`` convention [d_mlp, d_model] (:meth:`~Arch.output_weights`);
* how an MLP is narrowed to a subset of its neurons and how the config says so (:meth:`~Arch.shrink_mlp`,
  :attr:`~Arch.width_key`, :meth:`~Arch.width`, :meth:`~Arch.set_width`);
* the stacked MLP weight views the weight analyses read from the TransformerLens model (:meth:`~Arch.mlp_weights`,
  :meth:`~Arch.mlp_input_bias`).

Families:

* :class:`LlamaArch`, gated MLPs with ``gate_proj``/``up_proj``/``down_proj`` ``Linear`` layers under
  ``model.layers`` (Llama, Mistral, Qwen, SmolLM2). Narrowing removes rows of ``gate_proj``/``up_proj`` and columns
  of ``down_proj``; an output bias needs ``mlp_bias=True`` in the config, which also gives gate and up a bias
  (set to zero).
* :class:`GPT2Arch`, ``Conv1D`` MLPs with ``c_fc``/``c_proj`` under ``transformer.h`` (GPT-2). Narrowing removes
  columns of ``c_fc`` (and its bias entries) and rows of ``c_proj``; an extra output bias is added to
  ``c_proj.bias``.

:func:`arch_for` picks the adapter of a ``TransformerBridge`` (through its wrapped HF model, whose submodules the
bridge replaces in place by components that forward the HF attribute names) or of a plain HF model: the adapters
in :data:`ADAPTERS` are asked in order and the first whose :meth:`~Arch.matches` accepts the model is used, so a
more specific family goes before a more general one it resembles. Any other model is refused with a ValueError
that names the supported families.

:func:`clean_state_dict` gives the HF model's own tensors under the names a freshly built HF model of the same
config uses (the bridge's wrappers add ``._original_component`` to every name, alias views such as ``mlp.in`` and
synthetic buffers such as a zero unembedding bias).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

Module = torch.nn.Module


def hf_model(model: Module) -> Module:
    """The Hugging Face model of a ``TransformerBridge`` (its ``original_model``), or ``model`` itself."""
    return getattr(model, "original_model", model)


def _linear(weight: Tensor, bias: Optional[Tensor]) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    lin.weight = torch.nn.Parameter(weight.contiguous())
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.contiguous())
    return lin


class Arch:
    """The adapter of one model family. Methods taking ``hf`` read the Hugging Face module tree (a plain HF model
    or a bridge's wrapped one); methods taking ``model`` read the TransformerLens model.

    Attributes:
        name: short name of the family.
        description: what the family's models look like, for error messages.
        width_key: the config field holding the MLP width.
    """

    name: str = ""
    description: str = ""
    width_key: str = ""

    def matches(self, model: Module) -> bool:
        """True when ``model`` (a bridge or an HF model) belongs to this family."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ module tree

    def decoder_layers(self, hf: Module) -> torch.nn.ModuleList:
        """The decoder layers, in order."""
        raise NotImplementedError

    def final_norm(self, hf: Module) -> Module:
        """The norm applied to the residual stream after the last decoder layer."""
        raise NotImplementedError

    def unembed(self, hf: Module) -> Module:
        """The unembedding (language-model head)."""
        return hf.lm_head

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

    # ------------------------------------------------------------------------------------------ MLP weights

    def output_weights(self, hf: Module, layer: int) -> Tensor:
        """[d_mlp, d_model] output weights of one MLP (the ``W_out`` convention), fp32 copy."""
        raise NotImplementedError

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
        """Raw MLP matrices, detached fp32 on CPU: ``in``/``gate`` [L, d_model, d_mlp], ``out`` [L, d_mlp, d_model]
        (``gate`` only for gated MLPs), from the TransformerLens model's stacked ``W_in``/``W_gate``/``W_out``."""
        out = {"in": model.W_in.detach().float().cpu(), "out": model.W_out.detach().float().cpu()}
        gate = model.W_gate
        if gate is not None:
            out["gate"] = gate.detach().float().cpu()
        return out

    def mlp_input_bias(self, model: Module) -> Optional[Tensor]:
        """``b_in`` [L, d_mlp] when the MLP has an input bias, else None (the bridge refuses ``b_in`` for
        bias-free projections)."""
        try:
            return model.b_in.detach().float().cpu()
        except (AttributeError, TypeError):
            return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LlamaArch(Arch):
    """Gated MLPs (``gate_proj``/``up_proj``/``down_proj``) under ``model.layers``: Llama, Mistral, Qwen, SmolLM2."""

    name = "llama"
    description = "Llama-style decoders (model.layers with gate_proj/up_proj/down_proj MLPs: Llama, Mistral, Qwen, SmolLM2)"
    width_key = "intermediate_size"

    def matches(self, model: Module) -> bool:
        hf = hf_model(model)
        body = getattr(hf, "model", None)
        layers = getattr(body, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0 or not hasattr(body, "norm"):
            return False
        mlp = getattr(layers[0], "mlp", None)
        return hasattr(hf, "lm_head") and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))

    def decoder_layers(self, hf: Module) -> torch.nn.ModuleList:
        return hf.model.layers

    def final_norm(self, hf: Module) -> Module:
        return hf.model.norm

    def rotary(self, hf: Module) -> Optional[Module]:
        return getattr(hf.model, "rotary_emb", None)

    def output_weights(self, hf: Module, layer: int) -> Tensor:
        return self.mlp(hf, layer).down_proj.weight.detach().float().t().clone()

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


class GPT2Arch(Arch):
    """``Conv1D`` MLPs (``c_fc``/``c_proj``, weights stored [in, out]) under ``transformer.h``: GPT-2."""

    name = "gpt2"
    description = "GPT-2-style decoders (transformer.h with Conv1D c_fc/c_proj MLPs)"
    width_key = "n_inner"

    def matches(self, model: Module) -> bool:
        hf = hf_model(model)
        body = getattr(hf, "transformer", None)
        layers = getattr(body, "h", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0 or not hasattr(body, "ln_f"):
            return False
        mlp = getattr(layers[0], "mlp", None)
        return hasattr(hf, "lm_head") and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj")

    def decoder_layers(self, hf: Module) -> torch.nn.ModuleList:
        return hf.transformer.h

    def final_norm(self, hf: Module) -> Module:
        return hf.transformer.ln_f

    def output_weights(self, hf: Module, layer: int) -> Tensor:
        return self.mlp(hf, layer).c_proj.weight.detach().float().clone()

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


# Asked in order by arch_for: a more specific family must come before a more general one it resembles.
ADAPTERS: List[Arch] = [LlamaArch(), GPT2Arch()]


def supported_kinds() -> str:
    """The supported families, for messages."""
    return "; ".join(a.description for a in ADAPTERS)


def arch_for(model: Module) -> Arch:
    """The adapter of a ``TransformerBridge`` or a plain Hugging Face model.

    Raises ValueError naming the supported families when no adapter accepts the model (an encoder, a decoder whose
    MLP has neither supported form).
    """
    for arch in ADAPTERS:
        if arch.matches(model):
            return arch
    raise ValueError(f"{type(hf_model(model)).__name__} is not a supported model kind; supported: {supported_kinds()}.")


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
    """Raw MLP matrices of a TransformerLens model, detached fp32 on CPU: ``in``/``gate`` [L, d_model, d_mlp],
    ``out`` [L, d_mlp, d_model] (``gate`` only for gated MLPs)."""
    return arch_for(model).mlp_weights(model)


def mlp_input_bias(model: Module) -> Optional[Tensor]:
    """``b_in`` [L, d_mlp] of a TransformerLens model when the MLP has an input bias, else None."""
    return arch_for(model).mlp_input_bias(model)
