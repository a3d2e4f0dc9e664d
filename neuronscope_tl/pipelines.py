"""Pipelines the front ends share: the CLI, the web app and the benchmarks call these, never their own copies.

* :func:`calibration_texts_for` / :func:`evaluation_sets_for`: resolve the calibration texts and the named
  evaluation sets from user choices (a text file, ``NAME=FILE`` sets) or the defaults of
  :mod:`neuronscope_tl.domains`, refusing bad input before any model work.
* :func:`prune_and_save`: select, measure per domain (hook simulation), physically prune and save, returning a
  :class:`PruneReport`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .domains import (
    DEFAULT_CALIBRATION_DOMAINS,
    TextSet,
    calibration_sources,
    check_unique,
    default_evaluation_sets,
    mixed_calibration_texts,
    user_set,
)
from .evaluation import DEFAULT_DOMAIN_WINDOWS, DEFAULT_WINDOW, domain_perplexities, domain_summary, domain_windows
from .export import Result, write_json
from .recipes import DISTILL_TOKENS, RECOMMENDED_CALIB_TOKENS, distill_windows, recipe_spec, resolve_recipe
from .selection import Calibration, check_scope, check_sparsity
from .sequential import calibration_windows, check_sequential_scope, sequential_sources
from .surgery import PrunedModel, check_out_dir, save_pruned, simulation_hooks
from .texts import check_max_tokens, read_text_file, tokenize


def calibration_texts_for(calib_file: Optional[str] = None) -> Tuple[List[str], Sequence[str]]:
    """(calibration texts, names of the domains they come from): the user's file, or the default mix."""
    if calib_file is None:
        return mixed_calibration_texts(DEFAULT_CALIBRATION_DOMAINS), DEFAULT_CALIBRATION_DOMAINS
    try:
        return read_text_file(calib_file), ()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read calibration text file {calib_file}: {exc}.") from None


def evaluation_sets_for(
    eval_specs: Sequence[str] = (), calibration_domains: Sequence[str] = DEFAULT_CALIBRATION_DOMAINS, defaults: bool = True
) -> List[TextSet]:
    """The default evaluation sets (held-out part of each calibration domain, all of the others) and the user's
    ``NAME=FILE`` sets (out-of-domain), with unique names."""
    sets = default_evaluation_sets() if defaults else []
    for s in sets:
        s.in_domain = s.name in calibration_domains
    users = [user_set(spec, "user") for spec in eval_specs]
    for s in users:
        s.in_domain = False
    return check_unique(sets + users)


def check_calibration_size(model, texts: Sequence[str], calib_tokens: int) -> int:
    """The number of calibration tokens the texts hold; a ValueError when fewer than ``calib_tokens``."""
    have = sum(int(t.numel()) for t in tokenize(model, texts, max_tokens=calib_tokens))
    if have < calib_tokens:
        raise ValueError(
            f"the calibration texts hold {have} tokens, fewer than the {calib_tokens} asked for; "
            f"give more text or ask for at most {have} calibration tokens."
        )
    return have


@dataclass
class PruneReport(Result):
    """What ``prune`` did and what it costs, per evaluation domain.

    Attributes:
        method / ablation / scope / sparsity: the pruning, and ``method_source``: ``given`` or ``recommended``.
        recipe: the whole recipe (:class:`~neuronscope_tl.recipes.Recipe`): method, ablation, calibration mode
            and refit.
        calibration: the calibration texts (name, count, hash, tokens) and mode.
        evaluation: per set: dense and pruned perplexity (hook simulation, bf16 autocast) and their ratio; the
            in-domain, out-of-domain and overall geometric means; every set's source, licence, tokens and hash.
        model: the :class:`~neuronscope_tl.surgery.PrunedModel` written.
    """

    method: str
    method_source: str
    ablation: str
    scope: str
    sparsity: float
    calibration: dict
    evaluation: Optional[dict]
    model: PrunedModel = field(repr=False)
    recipe: dict = field(default_factory=dict)


def prune_and_save(
    model,
    sparsity: float,
    out: Union[str, Path],
    method: Optional[str] = None,
    scope: str = "per_layer",
    ablation: Optional[str] = None,
    calib_texts: Optional[Sequence[str]] = None,
    calibration_domains: Sequence[str] = DEFAULT_CALIBRATION_DOMAINS,
    calib_tokens: int = RECOMMENDED_CALIB_TOKENS,
    eval_sets: Optional[Sequence[TextSet]] = None,
    overwrite: bool = False,
    measure_latency: bool = True,
    window: int = DEFAULT_WINDOW,
    calibration: Optional[Calibration] = None,
    log: Callable[[str], None] = lambda _: None,
    calibration_mode: Optional[str] = None,
    refit=None,
    distill: Optional[int] = None,
    distill_tokens: int = DISTILL_TOKENS,
) -> PruneReport:
    """Calibrate, select, measure every evaluation set dense and pruned, then write the smaller model to ``out``
    with ``pruning_report.json`` beside it.

    ``method=None`` takes the recommended recipe (:data:`~neuronscope_tl.recipes.RECOMMENDED`, chosen on
    out-of-domain text); ``ablation``, ``calibration_mode`` (``oneshot`` / ``sequential``), ``refit`` and
    ``distill`` (epochs, on ``distill_tokens`` tokens of the same sources: :func:`~neuronscope_tl.recipes.distill_windows`)
    override its fields (:func:`~neuronscope_tl.recipes.resolve_recipe`). ``calib_texts=None`` calibrates on the default
    domains ``calibration_domains`` (one-shot: their token-balanced mix; sequential: one fold per domain);
    ``calibration`` reuses a one-shot calibration already computed (then ``calib_texts`` and ``calib_tokens`` only
    choose the windows a distilled recipe trains on). ``eval_sets=None`` skips the perplexity check.
    """
    method_source = "given" if method is not None else "recommended"
    recipe = resolve_recipe(method, ablation, calibration_mode, refit, distill)
    sparsity, scope = check_sparsity(sparsity), check_scope(scope)
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    check_out_dir(out, overwrite)
    if recipe.calibration == "sequential":
        check_sequential_scope(scope)
    windows = train_windows = None
    sources = sequential_sources(calib_texts, None if calib_texts is not None else calibration_sources(calibration_domains))
    if recipe.calibration == "sequential":
        windows = calibration_windows(model, sources, calib_tokens)  # too little text fails here, before any work
    if recipe.distill:
        train_windows = distill_windows(model, calib_sources=sources, calib_tokens=calib_tokens, distill_tokens=distill_tokens)
    if recipe.calibration == "oneshot" and calibration is None:
        if calib_texts is None and tuple(calibration_domains) != DEFAULT_CALIBRATION_DOMAINS:
            calib_texts = mixed_calibration_texts(calibration_domains)
        check_calibration_size(model, calib_texts if calib_texts is not None else mixed_calibration_texts(), calib_tokens)
    sets = domain_windows(model, eval_sets, min(window, int(model.cfg.n_ctx)), DEFAULT_DOMAIN_WINDOWS) if eval_sets else None

    log(f"calibrating on {calib_tokens} tokens: {recipe.describe()}")
    spec, calib_record = recipe_spec(
        model,
        recipe,
        sparsity,
        scope,
        calib_texts,
        calibration=calibration,
        windows=windows,
        calib_tokens=calib_tokens,
        progress=True,
        train_windows=train_windows,
    )
    if spec is None:
        raise ValueError(f"sparsity {sparsity} removes no neuron; use a sparsity in (0, 1) large enough for one neuron.")
    evaluation = None
    if sets is not None:
        log(f"measuring {len(sets)} evaluation sets, dense and pruned")
        dense = domain_perplexities(model, sets, bf16=True)
        pruned = domain_perplexities(model, sets, simulation_hooks(spec), bf16=True)
        evaluation = {
            "dense": dense,
            "pruned": pruned,
            **domain_summary(pruned, dense, sets),
            "sets": [{**d.wins.texts, "in_domain": d.in_domain} for d in sets],
            "precision": "bf16-autocast",
        }
    log(f"writing the pruned model to {out}")
    result = save_pruned(model, spec, out, overwrite=overwrite, measure_latency=measure_latency)
    report = PruneReport(
        method=recipe.method,
        method_source=method_source,
        ablation=recipe.ablation,
        scope=scope,
        sparsity=sparsity,
        calibration=calib_record,
        evaluation=evaluation,
        model=result,
        recipe=asdict(recipe),
    )
    write_json(Path(out) / "pruning_report.json", report.to_dict())
    return report
