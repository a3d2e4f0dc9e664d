"""Model-family adapters: the right adapter for each tiny kind, a clear refusal of other models, and the adapter's
views equal to the raw Hugging Face weights."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from neuronscope_tl import arch, weights
from neuronscope_tl.arch import GPT2Arch, LlamaArch, arch_for, clean_state_dict

EXPECTED = {"llama": LlamaArch, "gpt2": GPT2Arch}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def raw_output_weights(hf, layer: int) -> torch.Tensor:
    """The HF MLP's output matrix in the [d_mlp, d_model] convention, read by hand: down_proj.weight.T (Llama) or
    c_proj.weight (GPT-2's Conv1D stores [in, out])."""
    if hasattr(hf, "transformer"):
        return hf.transformer.h[layer].mlp.c_proj.weight
    return hf.model.layers[layer].mlp.down_proj.weight.t()


def test_arch_for_picks_the_adapter_of_each_kind(tiny_model, fresh_hf, tiny_kind):
    for model in (tiny_model, tiny_model.original_model, fresh_hf):
        assert type(arch_for(model)) is EXPECTED[tiny_kind]
    adapter = arch_for(fresh_hf)
    n_layers = int(tiny_model.cfg.n_layers)
    assert len(adapter.decoder_layers(fresh_hf)) == len(adapter.decoder_layers(tiny_model.original_model)) == n_layers
    assert adapter.width(fresh_hf.config) == int(tiny_model.cfg.d_mlp)
    assert adapter.final_norm(fresh_hf) is not None and adapter.unembed(fresh_hf) is fresh_hf.lm_head
    assert (adapter.rotary(fresh_hf) is None) == (tiny_kind == "gpt2")


def test_encoder_is_refused_naming_the_supported_kinds():
    bert = BertForMaskedLM(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="BertForMaskedLM is not a supported model kind") as err:
        arch_for(bert)
    assert "Llama-style" in str(err.value) and "GPT-2-style" in str(err.value)


def test_decoder_with_an_mlp_of_neither_form_is_refused(fresh_hf):
    """Adapters recognise a family by its MLP's parts, so a decoder whose MLP has neither form is refused."""
    adapter = arch_for(fresh_hf)
    adapter.decoder_layers(fresh_hf)[0].mlp = torch.nn.Identity()
    with pytest.raises(ValueError, match="not a supported model kind .*; supported: .*Llama-style"):
        arch_for(fresh_hf)


def test_output_weights_equal_the_raw_hf_matrix(tiny_model, fresh_hf):
    adapter = arch_for(fresh_hf)
    for layer in range(int(tiny_model.cfg.n_layers)):
        raw = raw_output_weights(fresh_hf, layer)
        got = adapter.output_weights(fresh_hf, layer)
        assert got.dtype == torch.float32 and got.shape == (int(tiny_model.cfg.d_mlp), int(tiny_model.cfg.d_model))
        assert torch.equal(got, raw)
        assert torch.equal(adapter.output_weights(tiny_model.original_model, layer), raw)  # through the bridge's wrappers
        assert torch.equal(got, tiny_model.W_out[layer].detach())  # the TransformerLens W_out convention
        got.zero_()  # a copy: the model keeps its weights
        assert raw.abs().sum() > 0


def test_clean_state_dict_has_a_fresh_hf_models_names_and_values(tiny_model, fresh_hf):
    state = clean_state_dict(tiny_model)
    fresh = fresh_hf.state_dict()
    assert list(state) == [k for k in state if k in fresh] and set(state) == set(fresh)
    for key, value in fresh.items():
        assert torch.equal(state[key], value), key
    assert set(clean_state_dict(fresh_hf)) == set(fresh)


def test_mlp_weight_views(tiny_model, tiny_kind):
    assert weights.mlp_weights is arch.mlp_weights and weights.mlp_input_bias is arch.mlp_input_bias
    w = arch.mlp_weights(tiny_model)
    n_layers, d_model, d_mlp = int(tiny_model.cfg.n_layers), int(tiny_model.cfg.d_model), int(tiny_model.cfg.d_mlp)
    assert set(w) == ({"in", "gate", "out"} if tiny_kind == "llama" else {"in", "out"})
    assert w["in"].shape == (n_layers, d_model, d_mlp) and w["out"].shape == (n_layers, d_mlp, d_model)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in w.values())
    bias = arch.mlp_input_bias(tiny_model)
    if tiny_kind == "llama":
        assert bias is None  # bias-free projections
    else:
        hf = tiny_model.original_model
        assert torch.equal(bias, torch.stack([hf.transformer.h[l].mlp.c_fc.bias.detach() for l in range(n_layers)]))
