"""The embedded default model is a working language model, not just a model that loads: its dense perplexity on
the Lee evaluation split falls in a narrow band around the value measured once."""

import pytest

from neuronscope_tl import evaluation

# Measured once (fp32, torch 2.13 CPU, transformers 5.24): every 9th 512-token window of Lee articles 200-299,
# 6 windows, 3,066 scored tokens: perplexity 32.05. (The default protocol, every 3rd window: 30.57.)
MEASURED = 32.05
# fp32 rounding moves this by ~1e-5 relative between CPUs; the band allows 5%. Conversion faults measured on the
# same windows all land outside it: q_proj transposed in every layer x313, gate/up swapped x1e7, final norm
# weight set to 1 x6e5, q/k rows left in the interleaved (unpermuted) rotary order x14.9, one layer's down_proj
# zeroed x1.14 (layer 15), x4.9 (layer 29), x55,000 (layer 0), layer 15's o_proj zeroed x1.11.
BAND = (MEASURED / 1.05, MEASURED * 1.05)

# One thread: on a shared 2-core machine two OpenMP threads wait on each other (measured 57 s against 15 s here).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.default_model
def test_default_model_perplexity_on_the_evaluation_split(default_model):
    result = evaluation.evaluate_perplexity(default_model, every=9)
    assert result.n_windows == 6 and result.n_tokens == 3066  # the windows the band was measured on
    assert BAND[0] <= result.perplexity <= BAND[1], result.perplexity
