"""The streaming engine's output readers and variants, checked against TransformerLens's own forwards."""

import pytest
import torch

from neuronscope_tl import engine
from neuronscope_tl.hooks import ablation_hooks, hook_count, is_mlp_post, mlp_post_name, resid_post_name
from neuronscope_tl.texts import batches, tokenize

TEXTS = ["The cat sat on the mat.", "A much longer sentence about the weather, the news and the markets today.", "Hi"]
PLAN = {1: ([0, 3, 5], None)}


class Recorder:
    """Keeps every output and observation the engine feeds it."""

    needs_grad = False

    def __init__(self, layers=(), captures=()):
        self.layers, self.captures = list(layers), list(captures)
        self.outputs, self.observations, self.ends = [], [], 0

    def output(self, out):
        self.outputs.append(out)

    def observe(self, obs):
        self.observations.append(obs)

    def end_batch(self, batch):
        self.ends += 1


def expected(model, batch, hooks=()):
    """Log-probabilities, residual streams and MLP activations of one batch from ``run_with_cache``."""
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        logits, cache = model.run_with_cache(batch.tokens)
    return torch.log_softmax(logits.float(), -1), cache


def test_variants_feed_outputs_captures_and_activations(tiny_model):
    model = tiny_model
    tokens = tokenize(model, TEXTS)
    rec = Recorder(layers=[1], captures=[resid_post_name(2)])
    engine.run(model, tokens, [rec], batch_size=2, variants=[[], ablation_hooks(PLAN)])
    cpu_batches = list(batches(model, tokens, 2))
    assert hook_count(model) == 0
    assert rec.ends == len(cpu_batches)
    assert [o.variant for o in rec.outputs] == [0, 1] * len(cpu_batches)
    assert [o.variant for o in rec.observations] == [0, 1] * len(cpu_batches)
    for i, batch in enumerate(cpu_batches):
        for variant, hooks in enumerate([[], ablation_hooks(PLAN)]):
            logp, cache = expected(model, batch, hooks)
            out, obs = rec.outputs[2 * i + variant], rec.observations[2 * i + variant]
            torch.testing.assert_close(out.logp, logp, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.captured[resid_post_name(2)], cache[resid_post_name(2)], rtol=0, atol=1e-5)
            # readers see the activations as the variant's hooks left them, real tokens only
            torch.testing.assert_close(obs.acts, cache[mlp_post_name(1)][batch.mask], rtol=0, atol=1e-5)
            if variant == 1:
                assert torch.all(obs.acts[:, PLAN[1][0]] == 0)
                assert not torch.all(rec.observations[2 * i].acts[:, PLAN[1][0]] == 0)


def test_one_variant_keeps_its_hooks_for_the_pass_and_removes_them(tiny_model):
    model = tiny_model
    seen = []
    hooks = [(mlp_post_name(0), lambda act, hook=None: seen.append(1))]
    rec = Recorder()
    engine.run(model, tokenize(model, TEXTS), [rec], batch_size=1, variants=[hooks])
    assert len(seen) == len(TEXTS) == len(rec.outputs)
    assert hook_count(model) == 0


def test_hooks_removed_when_an_output_reader_raises(tiny_model):
    class Boom(Recorder):
        def output(self, out):
            if out.variant == 1:
                raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        engine.run(tiny_model, tokenize(tiny_model, TEXTS), [Boom()], variants=[[], ablation_hooks(PLAN)])
    assert hook_count(tiny_model) == 0


def test_bf16_is_autocast_and_a_callers_autocast_is_kept(tiny_model):
    model = tiny_model
    tokens = tokenize(model, TEXTS[:1])
    (batch,) = batches(model, tokens, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.log_softmax(model(batch.tokens).float(), -1)
    fp32, own, callers = Recorder(), Recorder(), Recorder()
    engine.run(model, tokens, [fp32])
    engine.run(model, tokens, [own], bf16=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.run(model, tokens, [callers])
    assert torch.equal(own.outputs[0].logp, want)
    assert torch.equal(callers.outputs[0].logp, want)
    assert not torch.equal(fp32.outputs[0].logp, want)


def test_no_readers_runs_nothing_and_variants_must_be_given(tiny_model):
    class Nothing:
        layers, needs_grad = (), False

    engine.run(tiny_model, tokenize(tiny_model, TEXTS), [Nothing()])
    with pytest.raises(ValueError, match="at least one hook set"):
        engine.run(tiny_model, tokenize(tiny_model, TEXTS), [Recorder()], variants=[])


def test_activation_readers_alone_stop_after_the_last_read_layer(tiny_model):
    """Without output readers the forward stops after the last read layer; the activations are the cache's."""

    class Activations:
        layers, needs_grad = [0], False

        def __init__(self):
            self.observations = []

        def observe(self, obs):
            self.observations.append(obs)

    model = tiny_model
    tokens = tokenize(model, TEXTS)
    acc, late = Activations(), []
    engine.run(model, tokens, [acc], batch_size=3, variants=[[(resid_post_name(2), lambda act, hook=None: late.append(1))]])
    assert late == []
    (batch,) = batches(model, tokens, 3)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter=is_mlp_post)
    torch.testing.assert_close(acc.observations[0].acts, cache[mlp_post_name(0)][batch.mask], rtol=0, atol=1e-5)
