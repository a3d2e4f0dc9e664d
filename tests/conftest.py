"""Shared fixtures: tiny random models of both MLP kinds, built from a config here, and the default model.

The tiny models are saved to a temporary directory with a small byte-level BPE tokenizer trained on a few Lee
articles, then loaded through ``neuronscope_tl.load_model(dir)``, the same path a user's local model takes.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import neuronscope_tl as ns

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Hypothesis profiles. "ci" (the default) is derandomized: the same examples on every run and machine, no example
# database, so a CI failure reproduces exactly. "explore" draws fresh random examples, five times as many, for
# local bug hunting: HYPOTHESIS_PROFILE=explore python -m pytest tests/test_property_api.py
# Tests set only what their own cost dictates (deadline, health checks, max_examples through max_examples()).
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", derandomize=False, database=None, deadline=None, print_blob=True, max_examples=500,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(HYPOTHESIS_PROFILE)


def max_examples(n: int) -> int:
    """A test's example count: ``n`` under the ci profile; under another profile its count when that is larger."""
    return n if HYPOTHESIS_PROFILE == "ci" else max(n, settings.default.max_examples)

TINY_KINDS = ("llama", "gpt2")
PROBE_TEXT = "The quick brown fox jumps over the lazy dog, said the news agency on Monday."


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(ns.lee_articles()[:20]) + [PROBE_TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build_hf_model(kind: str, vocab_size: int, seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        )
        cfg.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    elif kind == "gpt2":
        cfg = dict(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=3, n_head=4, n_inner=64)
        cfg.update(overrides)
        model = GPT2LMHeadModel(GPT2Config(**cfg))
    else:
        raise ValueError(kind)
    # Random init gives near-uniform outputs; scale weights up so ablations visibly change predictions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def save_tiny(path, kind: str, **overrides):
    tok = build_tokenizer()
    model = build_hf_model(kind, len(tok), **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of many tiny-model calls, restored afterwards.

    Tiny models gain nothing from threads, and on a busy shared 2-core machine two OpenMP threads wait for each
    other: measured 0.6 s against 0.003 s per tiny forward at load average 7.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{kind: directory} of tiny random saved HF models."""
    return {kind: save_tiny(tmp_path_factory.mktemp(f"tiny-{kind}"), kind) for kind in TINY_KINDS}


@pytest.fixture(params=TINY_KINDS)
def tiny_kind(request):
    return request.param


@pytest.fixture
def tiny_model(tiny_dirs, tiny_kind):
    """A freshly loaded tiny bridge of each MLP kind (a fresh object per test, so no test can affect another)."""
    return ns.load_model(tiny_dirs[tiny_kind])


@pytest.fixture
def fresh_hf(tiny_dirs, tiny_kind):
    """A plain HF model loaded from the same directory, with eager attention like the bridge."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dirs[tiny_kind], attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct), converted once and cached."""
    return ns.load_model()


def probe_logits(model, text: str = PROBE_TEXT) -> torch.Tensor:
    with torch.no_grad():
        return model(model.to_tokens(text)).detach().clone()


def zero_output_weights(hf_model, layer: int, neurons):
    """Zero neuron n's output weights in the raw HF model: the down_proj column (Llama) or c_proj row (GPT-2)."""
    with torch.no_grad():
        if hasattr(hf_model, "transformer"):
            hf_model.transformer.h[layer].mlp.c_proj.weight[list(neurons), :] = 0.0
        else:
            hf_model.model.layers[layer].mlp.down_proj.weight[:, list(neurons)] = 0.0
    return hf_model
