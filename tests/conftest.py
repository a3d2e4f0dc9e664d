"""Shared fixtures: tiny random models of both MLP kinds, built from a config here, and the default model.

The tiny models are saved to a temporary directory with a small byte-level BPE tokenizer trained on a few Lee
articles, then loaded through ``neuronscope_tl.load_model(dir)``, the same path a user's local model takes.
"""

from __future__ import annotations

import copy
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
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    derandomize=False,
    database=None,
    deadline=None,
    print_blob=True,
    max_examples=500,
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
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
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


def fold_mean_into_bias(hf_model, layer: int, neurons, means):
    """Mean ablation done on raw HF weights: neuron n's output weights are zeroed and ``means[i] * w_n`` is added
    to the MLP output bias. Llama: a new ``down_proj`` Linear with a bias (``down_proj.weight[:, neurons] @
    means``); GPT-2: ``c_proj.bias += means @ c_proj.weight[neurons]``."""
    neurons = list(neurons)
    means = torch.as_tensor(means, dtype=torch.float32)
    with torch.no_grad():
        if hasattr(hf_model, "transformer"):
            proj = hf_model.transformer.h[layer].mlp.c_proj
            proj.bias += means @ proj.weight[neurons, :]
            proj.weight[neurons, :] = 0.0
        else:
            mlp = hf_model.model.layers[layer].mlp
            old = mlp.down_proj
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
            new.weight.copy_(old.weight)
            bias = old.weight[:, neurons] @ means
            new.bias.copy_(bias if old.bias is None else old.bias + bias)
            new.weight[:, neurons] = 0.0
            mlp.down_proj = new
    return hf_model


def mlp_inputs(hf_model, texts_tokens, layer: int) -> torch.Tensor:
    """The input of the MLP's output projection (down_proj / c_proj) of ``layer``, [n_tokens, d_mlp] in float64, read
    with a plain torch forward pre-hook on the HF module (no TransformerLens involved)."""
    mlp = hf_model.transformer.h[layer].mlp if hasattr(hf_model, "transformer") else hf_model.model.layers[layer].mlp
    proj = mlp.c_proj if hasattr(mlp, "c_proj") else mlp.down_proj
    seen = []
    handle = proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()[0].double()))
    try:
        with torch.no_grad():
            for ids in texts_tokens:
                hf_model(ids[None])
    finally:
        handle.remove()
    return torch.cat(seen)


# ---------------------------------------------------------------------------------------------- float64 references
# The library computes in fp32; references are computed in float64 from fp32 logits, and tolerances are derived
# from fp32 rounding (below), not tuned on one machine.

FP32_EPS = float(torch.finfo(torch.float32).eps)  # 1.19e-7: relative spacing of fp32 numbers


def log_softmax64(logits) -> torch.Tensor:
    return torch.log_softmax(torch.as_tensor(logits).double(), dim=-1)


def kl64(logits_p, logits_q) -> torch.Tensor:
    """Per-position KL(P || Q) in float64: [..., vocab] -> [...]."""
    lp, lq = log_softmax64(logits_p), log_softmax64(logits_q)
    return (lp.exp() * (lp - lq)).sum(-1)


def nll64(logits, tokens) -> torch.Tensor:
    """Per-position next-token cross-entropy in float64: logits [pos, vocab], tokens [pos] -> [pos - 1]."""
    lp = log_softmax64(logits)
    return -lp[:-1].gather(-1, torch.as_tensor(tokens)[1:, None]).squeeze(-1)


def logit_noise(a, b) -> float:
    """How far two fp32 computations of the same logits are apart: max |a - b|, floored at 4 fp32 ulps of the
    largest logit (two runs that happen to agree bit for bit here may not on another CPU)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return max(float((a - b).abs().max()), 4 * FP32_EPS * float(torch.maximum(a.abs().max(), b.abs().max())))


def kl_tolerance(logits_p, logits_q, eta: float, runs: int = 1) -> torch.Tensor:
    """Per-position bound on |KL_fp32 - KL64| for KL(P || Q) computed by the library in fp32 from logits that are
    within ``eta`` (absolute) of ``logits_p`` / ``logits_q``; ``runs=2`` when two fp32 computations are compared
    with each other. Pool it like the KL (mean over positions). Derivation, per position with lp = log p:

    * log-softmax rounds each log-prob once at its own magnitude: |d lp_v| <= eps |lp_v|, so
      sum_v p_v (lp_v - lq_v) moves by <= eps (E_p|lp| + E_p|lq|);
    * exp(lp) (relative error eps) and the fp32 sum over the vocabulary (at most n_vocab * eps relative to the
      sum of absolute terms, recursive summation) add <= (1 + n_vocab) eps E_p|lp - lq|;
    * logits off by <= eta shift each log-prob by <= 2 eta; with both distributions normalised, to first order
      |dKL| <= 2 eta (||p - q||_1 + E_p|lp - lq|), plus (2 eta)^2 of second order; doubled as a margin because
      eta is measured on the clean forward only.
    """
    lp, lq = log_softmax64(logits_p), log_softmax64(logits_q)
    p, q = lp.exp(), lq.exp()
    e_abs_d = (p * (lp - lq).abs()).sum(-1)
    fp32 = FP32_EPS * ((p * lp.abs()).sum(-1) + (p * lq.abs()).sum(-1) + (1 + lp.shape[-1]) * e_abs_d)
    noise = 2 * ((2 * eta) * ((p - q).abs().sum(-1) + e_abs_d) + (2 * eta) ** 2)
    return runs * fp32 + noise


def nll_tolerance(logits, tokens, eta: float, runs: int = 1) -> torch.Tensor:
    """Per-position bound on |NLL_fp32 - NLL64| ([pos - 1]): the target's log-prob rounds at its own magnitude
    (eps |lp|), and logits off by <= eta move it by <= 2 eta (doubled as a margin, as in :func:`kl_tolerance`)."""
    return runs * FP32_EPS * nll64(logits, tokens).abs() + 2 * 2 * eta


def hf_logits(hf_model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens)[None]).logits[0].detach().clone()


def load_hf(path):
    """A plain HF model from a saved directory, eager attention like the bridge, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def fp32_forward_error(hf_model, token_lists) -> float:
    """The fp32 rounding of a forward pass, measured: max |logits_fp32 - logits_fp64| over the texts, where the
    float64 run is a double-precision copy of the same weights. Two fp32 computations of the same function by
    different routes (other matmul shapes, a fused refit, hooks) differ by about twice this."""
    import copy

    double = copy.deepcopy(hf_model).double()
    err = 0.0
    with torch.no_grad():
        for ids in token_lists:
            ids = torch.as_tensor(ids)[None]
            err = max(err, float((hf_model(ids).logits.double() - double(ids).logits).abs().max()))
    return err


def single_and_padded_activations(model, token_lists, batch_size: int):
    """The bridge's ``mlp.hook_post`` activations, {layer: [n_tokens, d_mlp] float64}, computed one text at a time
    and right-padded in batches of ``batch_size`` (longest first, as analyses batch them), both in text order,
    read with TransformerLens's own run_with_cache."""
    from neuronscope_tl.hooks import is_mlp_post, layer_of
    from neuronscope_tl.texts import batches

    single, padded = {}, {}
    with torch.no_grad():
        for ids in token_lists:
            _, cache = model.run_with_cache(ids[None], names_filter=is_mlp_post)
            for name, act in cache.items():
                single.setdefault(layer_of(name), []).append(act[0].double())
        rows = {}
        for batch in batches(model, token_lists, batch_size):
            _, cache = model.run_with_cache(batch.tokens, names_filter=is_mlp_post)
            for name, act in cache.items():
                for row, (i, n) in enumerate(zip(batch.text_index, batch.lengths)):
                    rows[(layer_of(name), i)] = act[row, :n].double()
        for layer, i in sorted(rows):
            padded.setdefault(layer, []).append(rows[(layer, i)])
    cat = lambda d: {l: torch.cat(v) for l, v in d.items()}
    return cat(single), cat(padded)


def stat_tolerances(a, eta: float, threshold: float) -> dict:
    """Per-neuron bounds on the activation statistics when every activation may be off by ``eta`` (absolute):
    mean, mean |a|, rms and max move by <= eta; the population variance by <= 2 eta std + eta^2
    (mean |a - mu| <= std); the fraction active by the share of activations within eta of the threshold. Plus
    float64 accumulation rounding (<= 1e-12 of the largest |a|). ``a``: [n_tokens, d_mlp] float64."""
    slack = 1e-12 * float(a.abs().max())
    std = a.std(0, unbiased=False)
    near = ((a.abs() - threshold).abs() <= eta).double().mean(0)
    return {
        "mean": eta + slack,
        "mean_abs": eta + slack,
        "rms": eta + slack,
        "max": eta + slack,
        "var": 2 * eta * std + eta**2 + slack,
        "frac_active": near + 1e-12,
    }


# ---------------------------------------------------------------------------------------------- model kinds
# The mechanics tests run over every model kind the adapters support: bridges over tiny Llama and GPT-2 HF models
# (saved and loaded as above), and TransformerLens 3.x HookedTransformers built here from a HookedTransformerConfig
# (a gated RMS/rotary one like Llama, a LayerNorm/learned-position one like GPT-2). TransformerLens 4 removed
# HookedTransformer, so the hooked cases carry the ``hooked`` marker and are skipped there, saying why; CI's
# TransformerLens 3.9 environment runs them.

try:  # TransformerLens 3.x only
    from transformer_lens import HookedTransformer as _HookedTransformer  # noqa: F401

    HAS_HOOKED = True
except ImportError:
    HAS_HOOKED = False

HOOKED_SKIP_REASON = "HookedTransformer was removed in TransformerLens 4; these cases run in CI's TransformerLens 3.9 environment"
requires_hooked = pytest.mark.skipif(not HAS_HOOKED, reason=HOOKED_SKIP_REASON)


def hooked_param(kind: str):
    return pytest.param(kind, marks=[pytest.mark.hooked, requires_hooked], id=kind)


MODEL_KINDS = ("bridge-llama", "bridge-gpt2", "hooked-llama", "hooked-gpt2")
MODEL_KIND_PARAMS = [k if k.startswith("bridge") else hooked_param(k) for k in MODEL_KINDS]


def hooked_config(family: str, vocab_size: int, seed: int = 0):
    """A tiny HookedTransformerConfig: ``llama`` (gated SiLU MLP, RMSNorm, rotary, grouped-query attention) or
    ``gpt2`` (GELU MLP, LayerNorm, learned positions)."""
    from transformer_lens import HookedTransformerConfig

    common = dict(n_layers=3, d_model=32, d_head=8, n_heads=4, d_vocab=vocab_size, n_ctx=128, seed=seed, default_prepend_bos=True)
    if family == "llama":
        return HookedTransformerConfig(
            **common,
            d_mlp=48,
            act_fn="silu",
            normalization_type="RMS",
            gated_mlp=True,
            positional_embedding_type="rotary",
            rotary_dim=8,
            n_key_value_heads=2,
            final_rms=True,
        )
    if family == "gpt2":
        return HookedTransformerConfig(
            **common, d_mlp=64, act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"
        )
    raise ValueError(family)


def saved_tokenizer(path):
    """The tiny tokenizer saved to ``path`` and loaded back (TransformerLens 3.x re-loads a tokenizer from its
    ``name_or_path``, so it must come from a directory)."""
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def build_hooked(family: str, seed: int = 0, tokenizer_dir=None):
    """A tiny random HookedTransformer with the tiny tokenizer. Its weights are scaled up (x3) and its biases drawn at
    random so that ablations visibly change predictions and every bias path is exercised."""
    import tempfile

    from transformer_lens import HookedTransformer

    tok = saved_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-"))
    model = HookedTransformer(hooked_config(family, len(tok), seed), tok, move_to_device=False)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
            elif name.split(".")[-1].startswith("b_"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def processed_copy(model):
    """The same HookedTransformer with TransformerLens's from_pretrained processing applied to its weights (fold the
    norms, centre the writing weights and the unembedding, fold value biases): a processed-weights model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig.from_dict({**copy.deepcopy(model.cfg.to_dict()), "n_params": None})
    out = HookedTransformer(cfg, model.tokenizer, move_to_device=False)
    out.load_and_process_state_dict(
        {k: v.clone() for k, v in model.state_dict().items()},
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
    )
    return out.eval()


class KindModel:
    """A model of one kind and its plain reference: for a bridge, the HF model loaded from the same directory; for
    a HookedTransformer, a deep copy of it. References are edited in their weights, never through hooks."""

    def __init__(self, kind: str, tiny_dirs, hooked_models):
        self.kind = kind
        self.family = kind.split("-")[1]
        if kind.startswith("bridge"):
            self.path = tiny_dirs[self.family]
            self.model = ns.load_model(self.path)
        else:
            self.path = None
            self.model = copy.deepcopy(hooked_models[self.family])

    @property
    def hooked(self) -> bool:
        return self.path is None

    def reference(self):
        return load_hf(self.path) if self.path else copy.deepcopy(self.model)

    def logits(self, ref, tokens) -> torch.Tensor:
        """[pos, vocab] logits of a reference for one token sequence."""
        with torch.no_grad():
            if self.hooked:
                return ref(torch.as_tensor(tokens)[None])[0].detach().clone()
            return hf_logits(ref, tokens)

    def output_weights(self, ref, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] output weights, read by hand from the reference."""
        if self.hooked:
            return ref.blocks[layer].mlp.W_out.detach()
        if hasattr(ref, "transformer"):
            return ref.transformer.h[layer].mlp.c_proj.weight.detach()
        return ref.model.layers[layer].mlp.down_proj.weight.detach().t()

    def zero(self, ref, layer: int, neurons):
        if not self.hooked:
            return zero_output_weights(ref, layer, neurons)
        with torch.no_grad():
            ref.blocks[layer].mlp.W_out[list(neurons)] = 0.0
        return ref

    def fold_mean(self, ref, layer: int, neurons, means):
        if not self.hooked:
            return fold_mean_into_bias(ref, layer, neurons, means)
        mlp = ref.blocks[layer].mlp
        with torch.no_grad():
            mlp.b_out += torch.as_tensor(means, dtype=torch.float32) @ mlp.W_out[list(neurons)]
            mlp.W_out[list(neurons)] = 0.0
        return ref

    def forward_error(self, ref, token_lists) -> float:
        """Measured fp32 rounding of a forward (see :func:`fp32_forward_error`)."""
        if not self.hooked:
            return fp32_forward_error(ref, token_lists)
        double = copy.deepcopy(ref).double()
        err = 0.0
        with torch.no_grad():
            for ids in token_lists:
                ids = torch.as_tensor(ids)[None]
                err = max(err, float((ref(ids).double() - double(ids)).abs().max()))
        return err


@pytest.fixture(scope="session")
def hooked_models(tmp_path_factory):
    """{family: tiny HookedTransformer}, built once (tests take deep copies); empty without HookedTransformer."""
    if not HAS_HOOKED:
        return {}
    tok_dir = tmp_path_factory.mktemp("tiny-tokenizer")
    return {f: build_hooked(f, tokenizer_dir=tok_dir) for f in ("llama", "gpt2")}


@pytest.fixture(params=MODEL_KIND_PARAMS)
def kind_model(request, tiny_dirs, hooked_models):
    """A fresh model of each kind with its reference (see :class:`KindModel`)."""
    return KindModel(request.param, tiny_dirs, hooked_models)
