"""The one hook helper: hooks never leak, also when the body raises."""

import pytest
import torch

from neuronscope_tl.hooks import ablation_hook, attached_hooks, hook_count, mlp_post_name

from conftest import probe_logits


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_hooks_removed_when_body_raises(tiny_model, exc):
    before = hook_count(tiny_model)
    with pytest.raises(type(exc)):
        with attached_hooks(tiny_model, [(mlp_post_name(0), ablation_hook([1]))]):
            assert hook_count(tiny_model) == before + 1
            raise exc
    assert hook_count(tiny_model) == before == 0


def test_hooks_removed_when_hook_itself_raises(tiny_model):
    clean = probe_logits(tiny_model)

    def bad(act, hook):
        raise ValueError("inside hook")

    with pytest.raises(ValueError, match="inside hook"):
        with attached_hooks(tiny_model, [(mlp_post_name(1), bad)]):
            tiny_model(tiny_model.to_tokens("a b c"))
    assert hook_count(tiny_model) == 0
    assert torch.equal(probe_logits(tiny_model), clean)


def test_hooks_restore_training_mode_and_grad_flags(tiny_model):
    flags = [p.requires_grad for p in tiny_model.parameters()]
    with attached_hooks(tiny_model):
        tiny_model.train()
        for p in tiny_model.parameters():
            p.requires_grad_(False)
    assert not tiny_model.training
    assert [p.requires_grad for p in tiny_model.parameters()] == flags


def test_user_hooks_attached_before_are_left_alone(tiny_model):
    tiny_model.add_hook(mlp_post_name(0), lambda act, hook: None)
    with attached_hooks(tiny_model, [(mlp_post_name(0), ablation_hook([0]))]):
        assert hook_count(tiny_model) == 2
    assert hook_count(tiny_model) == 1
    tiny_model.reset_hooks()
