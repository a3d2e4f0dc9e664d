"""The evaluation protocol: perplexity over fixed token windows, recorded so that a number can be reproduced.

:func:`evaluate_perplexity` concatenates the evaluation texts (default: Lee articles 200-299), each with its BOS,
cuts them into non-overlapping ``window``-token windows and scores every ``every``-th window: perplexity is
exp(mean next-token NLL) over every scored token (a window's first token is context only). Every result carries
:func:`protocol_record`: model name, a SHA-256 of its weights, the texts (name, count, content hash), window, token
count, seed, precision and the torch / transformers / TransformerLens versions. ``bf16=True`` runs the forwards
under ``torch.autocast('cpu', torch.bfloat16)`` (weights stay fp32). Pruning curves (:mod:`neuronscope_tl.curves`)
and the pruning search (:mod:`neuronscope_tl.search`) measure on these windows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ._version import __version__
from .arch import hf_model
from . import engine
from .domains import TextSet, check_unique
from .export import Result
from .hooks import HookSpec
from .metrics import RunningMean, nll_from_log_probs, perplexity
from .models import model_name
from .texts import calibration_texts, check_int, check_texts, check_window, evaluation_texts, show, windows

DEFAULT_WINDOW = 512
# Every third window of the evaluation split: ~8.7k tokens, the default protocol (ratios match the full split).
DEFAULT_EVERY = 3
MAX_SEED = 2**63 - 1


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed: an integer in [0, 2**63 - 1]."""
    return check_int(seed, name, 0, MAX_SEED)


def check_seeds(seeds: Any) -> List[int]:
    """A non-empty list of seeds."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple, range, np.ndarray)) or len(seeds) == 0:
        raise ValueError(f"seeds must be a non-empty list of integers in [0, {MAX_SEED}], got {show(seeds)}.")
    return [check_seed(s, "each seed") for s in seeds]


def check_every(every: Any) -> int:
    """Score every n-th window: an integer >= 1."""
    return check_int(every, "every (score every n-th window)", 1)


def weights_hash(model) -> str:
    """SHA-256 over the HF model's parameters and buffers (clean names, sorted), first 16 hex digits."""
    h = hashlib.sha256()
    seen = set()
    for key, value in sorted(hf_model(model).state_dict().items()):
        clean = key.replace("._original_component", "")
        if clean in seen or not torch.is_tensor(value):
            continue
        seen.add(clean)
        h.update(clean.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def library_versions() -> Dict[str, str]:
    """Versions of torch, transformers, TransformerLens and this package (read from the installed metadata, so
    neither transformers nor TransformerLens is imported for it)."""
    return {
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "transformer_lens": version("transformer-lens"),
        "neuronscope_tl": __version__,
    }


def texts_record(texts: Optional[Sequence[str]], default: str) -> Tuple[List[str], dict]:
    """Resolve default texts (``"evaluation"`` or ``"calibration"``) and describe them: name, number of texts and
    SHA-256 of their content."""
    if texts is None:
        chosen = evaluation_texts() if default == "evaluation" else calibration_texts()
        name = "lee[200:300]" if default == "evaluation" else "lee[0:200]"
    else:
        chosen, name = check_texts(list(texts)), "user"
    digest = hashlib.sha256("\n".join(chosen).encode()).hexdigest()[:16]
    return chosen, {"name": name, "n_texts": len(chosen), "sha256": digest}


@dataclass
class EvalWindows:
    """The token windows one protocol scores: every ``every``-th non-overlapping window of ``window`` tokens."""

    tokens: List[Tensor]
    window: int
    every: int
    texts: dict

    @property
    def n_scored(self) -> int:
        return sum(int(t.numel()) - 1 for t in self.tokens)


def eval_windows(model, texts: Optional[Sequence[str]] = None, window: int = DEFAULT_WINDOW, every: int = 1) -> EvalWindows:
    """The windows of ``texts`` (default: the evaluation split) that the protocol scores."""
    every = check_every(every)
    window = check_window(model, window)
    chosen, record = texts_record(texts, "evaluation")
    wins = windows(model, chosen, window)[::every]
    return EvalWindows(wins, window, every, record)


class NLLSum:
    """Summed next-token NLL over the real targets of every forward, and their number: a streaming-engine
    accumulator that reads the model's output (:mod:`neuronscope_tl.engine`)."""

    layers = ()
    needs_grad = False

    def __init__(self):
        self.nll = RunningMean()

    def output(self, out: engine.Output) -> None:
        self.nll.add(nll_from_log_probs(out.logp, out.batch.tokens), out.batch.target_mask())

    def merge(self, other: "NLLSum") -> None:
        self.nll.merge(other.nll)


def window_nll(
    model, wins: EvalWindows, hooks: Sequence[HookSpec] = (), bf16: bool = False, progress: bool = False
) -> Tuple[float, int]:
    """Summed next-token NLL and number of scored tokens over the windows, with ``hooks`` attached.

    One engine pass (:func:`neuronscope_tl.engine.run`) with one window per forward, in the given order: no window
    is padded, and the windows are added up in order. Under torchrun each rank scores its share of the windows
    and the sums are added up (:mod:`neuronscope_tl.distributed`).
    """
    acc = NLLSum()
    engine.run(
        model,
        wins.tokens,
        [acc],
        batch_size=1,
        by_length=False,
        progress=progress,
        desc="perplexity",
        variants=[hooks],
        bf16=bf16,
    )
    return acc.nll.total, acc.nll.count


@dataclass
class PerplexityResult(Result):
    """Perplexity of a model on the protocol's windows.

    Attributes:
        perplexity: exp(mean next-token NLL) over every scored token (each window's first token is context only).
        mean_nll: that mean NLL in nats.
        n_tokens: tokens scored; n_windows: windows used.
        protocol: model, weight hash, texts, window, seed, precision and library versions.
    """

    perplexity: float
    mean_nll: float
    n_tokens: int
    n_windows: int
    protocol: dict


def protocol_record(model, wins: EvalWindows, seed: int, precision: str, calib: Optional[dict] = None) -> dict:
    """Everything needed to reproduce a measurement on ``wins``."""
    return {
        "model": model_name(model),
        "weights_sha256": weights_hash(model),
        "eval_texts": wins.texts,
        "window": wins.window,
        "every_nth_window": wins.every,
        "n_windows": len(wins.tokens),
        "n_tokens_scored": wins.n_scored,
        "calibration": calib,
        "seed": seed,
        "precision": precision,
        "versions": library_versions(),
    }


def evaluate_perplexity(
    model,
    texts: Optional[Sequence[str]] = None,
    window: int = DEFAULT_WINDOW,
    every: int = 1,
    bf16: bool = False,
    hooks: Sequence = (),
    seed: int = 0,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity over non-overlapping ``window``-token windows of ``texts`` (default: Lee articles 200-299).

    The texts are concatenated (each with its BOS) and cut into windows; ``every=3`` scores every third window.
    """
    seed = check_seed(seed)
    wins = eval_windows(model, texts, window, every)
    total, count = window_nll(model, wins, hooks, bf16, progress)
    return PerplexityResult(
        perplexity=perplexity(total, count),
        mean_nll=total / count,
        n_tokens=count,
        n_windows=len(wins.tokens),
        protocol=protocol_record(model, wins, seed, "bf16-autocast" if bf16 else "fp32"),
    )


# ---------------------------------------------------------------------------------------------- several domains

# Windows scored per evaluation set: 12 x 512 tokens, about 6k tokens of each domain.
DEFAULT_DOMAIN_WINDOWS = 12


@dataclass
class DomainWindows:
    """The windows of one named evaluation set (:class:`~neuronscope_tl.domains.TextSet`).

    Attributes:
        name: the set's name; in_domain: whether calibration saw other texts of its source (None: unknown).
        wins: up to ``max_windows`` windows spread evenly over the set (every n-th), with the set's record.
    """

    name: str
    in_domain: Optional[bool]
    wins: EvalWindows


def domain_windows(
    model, sets: Sequence[TextSet], window: int = DEFAULT_WINDOW, max_windows: int = DEFAULT_DOMAIN_WINDOWS
) -> List[DomainWindows]:
    """Each set's windows: all non-overlapping ``window``-token windows, then every n-th so that at most
    ``max_windows`` remain. Set names must be unique."""
    window = check_window(model, window)
    max_windows = check_int(max_windows, "max_windows", 1)
    out = []
    for s in check_unique(sets):
        every_window = windows(model, s.texts, window)
        every = max(1, -(-len(every_window) // max_windows))
        chosen = every_window[::every][:max_windows]
        record = s.record(n_tokens=sum(int(t.numel()) - 1 for t in chosen))
        out.append(DomainWindows(s.name, s.in_domain, EvalWindows(chosen, window, every, record)))
    return out


def domain_perplexities(model, sets: Sequence[DomainWindows], hooks: Sequence = (), bf16: bool = False) -> Dict[str, float]:
    """Perplexity of each set, with ``hooks`` attached."""
    return {d.name: perplexity(*window_nll(model, d.wins, hooks, bf16)) for d in sets}


def geometric_mean(values: Sequence[float]) -> Optional[float]:
    """exp(mean(log v)); None for no values."""
    values = list(values)
    return float(np.exp(np.mean(np.log(values)))) if values else None


def domain_summary(ppl: Dict[str, float], dense: Dict[str, float], sets: Sequence[DomainWindows]) -> dict:
    """Ratios to dense per set, and their geometric means in-domain, out-of-domain (sets whose source the
    calibration never saw, or of unknown relation) and over all sets."""
    ratios = {d.name: ppl[d.name] / dense[d.name] for d in sets}
    return {
        "ratios": ratios,
        "in_domain": geometric_mean([ratios[d.name] for d in sets if d.in_domain]),
        "out_of_domain": geometric_mean([ratios[d.name] for d in sets if not d.in_domain]),
        "all": geometric_mean(list(ratios.values())),
    }
