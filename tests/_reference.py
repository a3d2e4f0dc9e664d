"""Float64 references for impact metrics: plain HF models edited in their weights, metrics pooled over texts, and
the fp32 bounds a library number is compared with (see conftest.kl_tolerance / nll_tolerance)."""

from __future__ import annotations

import torch

from conftest import hf_logits, kl64, kl_tolerance, load_hf, logit_noise, nll64, nll_tolerance


def impact_reference(model_dir, tokens, change):
    """Float64 impact metrics of ``change(hf)`` (an edit of raw HF weights), pooled over the texts.

    Returns (impact, loss_change, top1, clean_logits, pruned_logits): impact = mean over every position of every
    text of KL(P_orig || P_pruned); loss_change = mean next-token NLL pruned minus original, pooled.
    """
    clean_hf = load_hf(model_dir)
    pruned_hf = change(load_hf(model_dir))
    clean = [hf_logits(clean_hf, t) for t in tokens]
    pruned = [hf_logits(pruned_hf, t) for t in tokens]
    impact = float(torch.cat([kl64(c, p) for c, p in zip(clean, pruned)]).mean())
    loss = float(torch.cat([nll64(p, t) - nll64(c, t) for c, p, t in zip(clean, pruned, tokens)]).mean())
    top1 = float(torch.cat([(c.argmax(-1) == p.argmax(-1)).double() for c, p in zip(clean, pruned)]).mean())
    return impact, loss, top1, clean, pruned


def impact_tolerances(clean, pruned, tokens, eta, runs=1):
    """Pooled bounds on |impact - impact64| and |loss_change - loss_change64| (conftest.kl_tolerance)."""
    kl_tol = float(torch.cat([kl_tolerance(c, p, eta, runs) for c, p in zip(clean, pruned)]).mean())
    loss_tol = float(
        torch.cat(
            [nll_tolerance(c, t, eta, runs) + nll_tolerance(p, t, eta, runs) for c, p, t in zip(clean, pruned, tokens)]
        ).mean()
    )
    return kl_tol, loss_tol


def bridge_noise(model, model_dir, tokens, batch_size):
    """How far the bridge's clean logits, batched and right-padded as the analysis batches them, are from plain HF
    on each text alone (the fp32 rounding both computations carry)."""
    from neuronscope_tl.texts import batches

    hf = load_hf(model_dir)
    eta = 0.0
    with torch.no_grad():
        for batch in batches(model, tokens, batch_size):
            logits = model(batch.tokens)
            for row, (i, length) in enumerate(zip(batch.text_index, batch.lengths)):
                eta = max(eta, logit_noise(logits[row, :length], hf_logits(hf, tokens[i])))
    return eta
