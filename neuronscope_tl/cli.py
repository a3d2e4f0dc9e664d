"""Command line: ``neuronscope-tl <command>``.

Each command parses its arguments into a config dataclass (``parse_args`` is a small testable function) and calls
library functions; no analysis logic lives here.

* ``analyze``: the seed's whole workflow (weight statistics, candidates, impact of the first candidates, neuron
  importance, batch test, export) on the default model and texts, writing report files to ``--out``.
* ``serve``: the web app (Gradio demo at /, the seed's REST API at /api/pruning, docs at /docs), bound to
  127.0.0.1 unless ``--host`` says otherwise.
* ``score``: every neuron scored in one pass (``scoring.score_pass``), the cheap scores validated against exact
  ablation (``scoring.validate_scores``); writes ``scores.csv``, ``scores.json``, ``validation.json`` and
  ``validation_measured.csv`` to ``--out`` and prints the Spearman correlations.
* ``curve``: pruning curves of every method against random (table CSV, protocol JSON, PNG plot).
* ``prune``: a physically smaller Hugging Face model directory (``save_pretrained`` + tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

DEFAULT_OUT = "neuronscope_report"


@dataclass
class AnalyzeConfig:
    """Settings of ``neuronscope-tl analyze``.

    Args:
        model: HF model id or local directory; None for the embedded default.
        texts: a text file, one text per line; None for the Lee corpus (calibration split for importance and
            mean values, evaluation split for impact).
        out: output directory (created if missing; existing report files are replaced atomically).
        threshold: candidate percentile in (0, 100].
        n_candidates: how many candidates get an impact simulation and enter the batch test.
        max_texts: how many texts each analysis uses (keeps the report to minutes on 2 cores).
        batch_size: texts per forward pass.
        ablation: ``zero`` or ``mean``.
        trust_remote_code: let transformers run the model repository's own Python code; off unless asked.
    """

    model: Optional[str] = None
    texts: Optional[str] = None
    out: str = DEFAULT_OUT
    threshold: float = 10.0
    n_candidates: int = 5
    max_texts: int = 4
    batch_size: int = 1
    ablation: str = "zero"
    trust_remote_code: bool = False

    def __post_init__(self):
        from .impact import check_ablation, check_batch_size
        from .weights import check_percentile

        check_percentile(self.threshold)
        check_ablation(self.ablation)
        check_batch_size(self.batch_size)
        if self.n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {self.n_candidates}.")
        if self.max_texts < 1:
            raise ValueError(f"max_texts must be >= 1, got {self.max_texts}.")
        if self.texts is not None and not Path(self.texts).is_file():
            raise ValueError(f"--texts {self.texts}: no such file.")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} exists and is not a directory.")


def add_analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model id or local directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--texts", default=None, help="text file, one text per line (default: Lee corpus)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--threshold", type=float, default=10.0, help="candidate percentile in (0, 100] (default 10)")
    p.add_argument("--n-candidates", type=int, default=5, help="candidates to simulate and batch-test (default 5)")
    p.add_argument("--max-texts", type=int, default=4, help="texts per analysis (default 4)")
    p.add_argument("--batch-size", type=int, default=1, help="texts per forward pass (default 1: fastest on CPU)")
    p.add_argument("--ablation", default="zero", choices=["zero", "mean"])
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="let transformers run Python code shipped with the model (off by default: only for models you trust)",
    )


def run_analyze(cfg: AnalyzeConfig, log=print) -> dict:
    """Run the seed's workflow and write the report files; returns the summary written to ``report.json``."""
    from . import activations, candidates, impact, models, texts, weights
    from .export import write_csv, write_json, report_document

    t0 = time.perf_counter()
    timings = {}
    out = Path(cfg.out)
    model = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    timings["load_s"] = time.perf_counter() - t0
    if cfg.texts:
        calib = evalt = texts.read_text_file(cfg.texts)
    else:
        calib, evalt = texts.calibration_texts(), texts.evaluation_texts()
    calib, evalt = calib[: cfg.max_texts], evalt[: cfg.max_texts]
    # validate texts before writing anything
    texts.tokenize(model, calib)
    texts.tokenize(model, evalt)
    out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    wa = weights.analyze_weights(model)
    files = [str(p) for p in weights.export_weights(wa, out / "weight_analysis.json")]
    timings["weights_s"] = time.perf_counter() - t
    log(f"weights: {wa.total_parameters:,} parameters, sparsity {wa.overall_sparsity:.4%} exactly zero, {wa.near_zero_fraction:.2%} |w| < {wa.near_zero_threshold}")

    t = time.perf_counter()
    cands = candidates.assess_candidates(model, cfg.threshold, calib_texts=calib, weight_table=wa.neurons)
    files.append(str(write_csv(out / "candidates.csv", cands)))
    first = candidates.first_candidates(cands, cfg.n_candidates)
    if first.empty:
        first = candidates.first_candidates(cands, cfg.n_candidates, safe_only=False)
    pairs = [(int(r.layer), int(r.neuron)) for r in first.itertuples()]
    timings["candidates_s"] = time.perf_counter() - t
    log(f"candidates: {len(cands)} neurons at or below the {cfg.threshold:g}th percentile of mean |w| in their layer, "
        f"{int(cands['is_pruning_candidate'].sum())} flagged safe by their activation evidence")
    log("  " + candidates.WEIGHT_ONLY_LIMITS.format(safe=candidates.DEFAULT_SAFE_PERCENTILE))

    t = time.perf_counter()
    sims = []
    for layer, neuron in pairs:
        r = impact.simulate_pruning(model, layer, [neuron], evalt, cfg.ablation, cfg.batch_size, calib_texts=calib)
        sims.append(r)
        log(f"impact L{layer}N{neuron}: {r.impact_score:.4f} nats ({r.verdict}), loss change {r.loss_change:+.4f}, top-1 {r.top1_agreement:.3f}")
    files.append(str(write_json(out / "impact_analysis.json", [impact.impact_document(r) for r in sims])))
    timings["impact_s"] = time.perf_counter() - t

    t = time.perf_counter()
    imp = activations.neuron_importance(model, calib, batch_size=cfg.batch_size, max_tokens=activations.DEFAULT_CALIB_TOKENS)
    files.append(str(write_csv(out / "neuron_importance.csv", imp.table)))
    imp_doc = report_document(
        "neuron_importance", imp.model, {"active_threshold": imp.active_threshold, "layers": imp.layers},
        {"n_texts": imp.n_texts, "n_tokens": imp.n_tokens}, {"critical": imp.critical},
    )
    files.append(str(write_json(out / "neuron_importance.json", imp_doc)))
    timings["importance_s"] = time.perf_counter() - t

    t = time.perf_counter()
    batch = impact.batch_analysis(model, pairs, evalt, cfg.batch_size, cfg.ablation, calib_texts=calib)
    files += [str(p) for p in impact.export_impact(batch, out / "batch_analysis.json")]
    timings["batch_s"] = time.perf_counter() - t
    rec = batch.recommendations
    log(f"batch: {len(rec['safe_to_prune'])} safe, {len(rec['moderate'])} moderate, {len(rec['risky_to_prune'])} risky; "
        f"cumulative impact {rec['cumulative_impact']:.4f} ({rec['cumulative_verdict']}), safe prefix {rec['max_safe_prefix']}")
    timings["total_s"] = time.perf_counter() - t0

    summary = {
        "model": models.model_name(model),
        "config": asdict(cfg),
        "overall_sparsity": wa.overall_sparsity,
        "total_parameters": wa.total_parameters,
        "n_candidates": len(cands),
        "n_safe_candidates": int(cands["is_pruning_candidate"].sum()),
        "candidate_limits": candidates.WEIGHT_ONLY_LIMITS.format(safe=candidates.DEFAULT_SAFE_PERCENTILE),
        "impacts": [{"layer_index": r.layer_index, "neuron_indices": r.neuron_indices, "impact_score": r.impact_score, "verdict": r.verdict} for r in sims],
        "recommendations": rec,
        "timings": timings,
        "files": files + [str(out / "report.json")],
    }
    write_json(out / "report.json", summary)
    log(f"wrote {len(summary['files'])} files to {out} in {timings['total_s']:.1f} s")
    return summary


@dataclass
class ServeConfig:
    """Settings of ``neuronscope-tl serve``.

    Args:
        model: HF model id or local directory; None for the embedded default.
        host: interface to bind; 127.0.0.1 (this machine only) by default. 0.0.0.0 exposes the app to the network.
        port: TCP port; 0 picks a free one.
        max_texts / max_tokens / max_candidates / max_batch_size / max_top_k / max_body_bytes / lock_timeout_s:
            the app's limits (see ``AppSettings``).
        trust_remote_code: let transformers run the model repository's own Python code; off unless asked.
    """

    model: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 7860
    max_texts: int = 16
    max_tokens: int = 4096
    max_candidates: int = 32
    max_batch_size: int = 16
    max_top_k: int = 100
    max_body_bytes: int = 1_000_000
    lock_timeout_s: float = 120.0
    trust_remote_code: bool = False

    def __post_init__(self):
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ValueError(f"--port must be in 0..65535, got {self.port!r}.")
        if not self.host:
            raise ValueError("--host must not be empty.")
        self.settings()  # validate the limits before loading the model

    def settings(self):
        from .app.state import AppSettings

        return AppSettings(
            max_texts=self.max_texts, max_tokens=self.max_tokens, max_candidates=self.max_candidates,
            max_batch_size=self.max_batch_size, max_top_k=self.max_top_k, max_body_bytes=self.max_body_bytes,
            lock_timeout_s=self.lock_timeout_s,
        )


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    p.add_argument("--model", default=None, help="HF model id or local directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default=d.host, help=f"interface to bind (default {d.host}: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port}; 0 = any free port)")
    p.add_argument("--max-texts", type=int, default=d.max_texts, help=f"texts per request (default {d.max_texts})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"tokens per request (default {d.max_tokens})")
    p.add_argument("--max-candidates", type=int, default=d.max_candidates, help=f"candidates per batch analysis (default {d.max_candidates})")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help=f"texts per forward pass (default {d.max_batch_size})")
    p.add_argument("--max-top-k", type=int, default=d.max_top_k, help=f"critical neurons per importance request (default {d.max_top_k})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help=f"REST request body size (default {d.max_body_bytes})")
    p.add_argument("--lock-timeout-s", type=float, default=d.lock_timeout_s, help=f"seconds a request waits for the busy model (default {d.lock_timeout_s:g})")
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="let transformers run Python code shipped with the model (off by default: only for models you trust)",
    )


def run_serve(cfg: ServeConfig, log=print) -> None:
    """Load the model, bind the socket (so the address printed is the one bound), and serve until interrupted."""
    from . import models
    from .app.server import bind, create_app, serve

    sock = bind(cfg.host, cfg.port)
    model = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    serve(create_app(model, cfg.settings()), sock, log=log)


@dataclass
class ScoreConfig:
    """Settings of ``neuronscope-tl score``.

    Args:
        model: HF model id or local directory; None for the embedded default.
        texts: a text file, one text per line; None for the Lee calibration split.
        out: output directory.
        max_tokens: calibration tokens for the scoring pass.
        batch_size: texts per forward pass.
        top_k_contexts: top-activating tokens kept per neuron.
        validate_n: neurons per validation set (lowest-scored per score, and random); 0 skips validation.
        validate_tokens: tokens of the same texts on which the validation ablates exactly.
        ablation: ``zero`` or ``mean`` for the validation.
        scores: comma-separated score columns to validate.
        seed: seed of the random validation set.
    """

    model: Optional[str] = None
    texts: Optional[str] = None
    out: str = DEFAULT_OUT
    max_tokens: int = 2048
    batch_size: int = 1
    top_k_contexts: int = 8
    validate_n: int = 200
    validate_tokens: int = 256
    ablation: str = "zero"
    scores: str = "w_out_norm,mean_abs,rms,wanda,fluctuation,taylor_zero,taylor_mean"
    seed: int = 0

    def __post_init__(self):
        from .impact import check_ablation, check_batch_size

        check_ablation(self.ablation)
        check_batch_size(self.batch_size)
        for name in ("max_tokens", "top_k_contexts", "validate_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.validate_n < 0 or self.validate_n == 1:
            raise ValueError(f"validate_n must be 0 (skip) or >= 2, got {self.validate_n}.")
        if self.texts is not None and not Path(self.texts).is_file():
            raise ValueError(f"--texts {self.texts}: no such file.")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} exists and is not a directory.")


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass
class CurveConfig:
    """Settings of ``neuronscope-tl curve``.

    Args:
        model: HF model id or local directory; None for the embedded default.
        out: output directory for curve.csv, curve_runs.csv, protocol.json and curve.png.
        methods: ranking methods (default: all, see :data:`neuronscope_tl.curves.METHODS`).
        sparsities: fractions of MLP neurons in [0, 1).
        scope: ``per_layer`` or ``global``.
        ablations: ``zero`` and/or ``mean``.
        every: score every n-th 512-token window of the evaluation split (3: the default protocol, ~8k tokens).
        calib_tokens: calibration tokens of the Lee calibration split.
        precision: ``auto`` (bf16 when within 0.5% of fp32 on the dense model), ``fp32`` or ``bf16``.
    """

    model: Optional[str] = None
    out: str = "neuronscope_curve"
    methods: List[str] = field(default_factory=lambda: list(_curves().METHODS))
    sparsities: List[float] = field(default_factory=lambda: list(_curves().DEFAULT_SPARSITIES))
    scope: str = "per_layer"
    ablations: List[str] = field(default_factory=lambda: ["zero", "mean"])
    every: int = 3
    calib_tokens: int = 8192
    precision: str = "auto"

    def __post_init__(self):
        from .impact import check_ablation

        c = _curves()
        for m in self.methods:
            c.check_method(m)
        for s in self.sparsities:
            c.check_sparsity(s)
        c.check_scope(self.scope)
        for a in self.ablations:
            check_ablation(a)
        if self.every < 1 or self.calib_tokens < 1:
            raise ValueError(f"every and calib_tokens must be >= 1, got {self.every}, {self.calib_tokens}.")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} exists and is not a directory.")


def add_score_args(p: argparse.ArgumentParser) -> None:
    d = ScoreConfig()
    p.add_argument("--model", default=None, help="HF model id or local directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--texts", default=None, help="text file, one text per line (default: Lee calibration split)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"tokens for the scoring pass (default {d.max_tokens})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="texts per forward pass (default 1)")
    p.add_argument("--top-k-contexts", type=int, default=d.top_k_contexts, help=f"top contexts kept per neuron (default {d.top_k_contexts})")
    p.add_argument("--validate-n", type=int, default=d.validate_n, help=f"neurons per validation set, 0 to skip (default {d.validate_n})")
    p.add_argument("--validate-tokens", type=int, default=d.validate_tokens, help=f"tokens for exact ablation (default {d.validate_tokens})")
    p.add_argument("--ablation", default="zero", choices=["zero", "mean"])
    p.add_argument("--scores", default=d.scores, help="comma-separated scores to validate")
    p.add_argument("--seed", type=int, default=0)


def run_score(cfg: ScoreConfig, log=print) -> dict:
    """Score every neuron, validate the scores, write the files; returns the summary written to ``score_report.json``."""
    from . import models, scoring, texts
    from .export import report_document, write_csv, write_json

    t0 = time.perf_counter()
    out = Path(cfg.out)
    model = models.load_model(cfg.model)
    calib = texts.read_text_file(cfg.texts) if cfg.texts else texts.calibration_texts()
    scores = [s.strip() for s in cfg.scores.split(",") if s.strip()]
    unknown = [s for s in scores if s not in scoring.SCORE_COLUMNS]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; choose from {', '.join(scoring.CHEAP_SCORES)}.")
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    result = scoring.score_pass(model, calib, cfg.batch_size, cfg.max_tokens, cfg.top_k_contexts)
    score_s = time.perf_counter() - t
    log(f"scored {len(result.table)} neurons over {result.n_tokens} tokens in {score_s:.1f} s")
    settings = asdict(cfg)
    files = [str(write_csv(out / "scores.csv", result.table))]
    files.append(str(write_json(out / "scores.json", report_document(
        "neuron_scores", models.model_name(model), settings, {"n_texts": len(result.token_lists), "n_tokens": result.n_tokens}, result.table))))
    summary = {"model": models.model_name(model), "config": settings, "score_s": score_s, "n_tokens": result.n_tokens}
    if cfg.validate_n:
        t = time.perf_counter()
        v = scoring.validate_scores(model, None, calib, cfg.validate_n, scores, cfg.ablation, cfg.validate_tokens, cfg.seed)
        summary["validate_s"] = time.perf_counter() - t
        files.append(str(write_csv(out / "validation_measured.csv", v.measured)))
        doc = {k: val for k, val in v.to_dict().items() if k != "measured"}
        files.append(str(write_json(out / "validation.json", report_document(
            "score_validation", models.model_name(model), settings, {"n_tokens": v.n_tokens}, doc))))
        summary["spearman_candidates"], summary["spearman_random"] = v.spearman_candidates, v.spearman_random
        log(f"Spearman rho with the exact loss change ({cfg.ablation} ablation, {v.n_tokens} tokens):")
        log(f"  {'score':<14}{'lowest ' + str(v.n):>12}{'random ' + str(v.n):>12}")
        for s in scores:
            log(f"  {s:<14}{v.spearman_candidates[s]:>12.3f}{v.spearman_random[s]:>12.3f}")
    summary["total_s"] = time.perf_counter() - t0
    summary["files"] = files + [str(out / "score_report.json")]
    write_json(out / "score_report.json", summary)
    log(f"wrote {len(summary['files'])} files to {out} in {summary['total_s']:.1f} s")
    return summary


def _curves():
    from . import curves

    return curves


def add_curve_args(p: argparse.ArgumentParser) -> None:
    c = _curves()
    p.add_argument("--model", default=None, help="HF model id or local directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="neuronscope_curve", help="output directory")
    p.add_argument("--methods", type=_names, default=list(c.METHODS), help=f"comma-separated, from {','.join(c.METHODS)}")
    p.add_argument("--sparsities", type=_floats, default=list(c.DEFAULT_SPARSITIES), help="comma-separated fractions in [0, 1)")
    p.add_argument("--scope", default="per_layer", help="per_layer or global")
    p.add_argument("--ablations", type=_names, default=["zero", "mean"], help="comma-separated: zero,mean")
    p.add_argument("--every", type=int, default=3, help="score every n-th 512-token evaluation window (default 3)")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16")


def run_curve(cfg: CurveConfig, log=print) -> dict:
    """Measure the curve and write curve.csv, curve_runs.csv, protocol.json and curve.png into ``cfg.out``."""
    from . import curves, models
    from .export import write_csv, write_json

    model = models.load_model(cfg.model)
    res = curves.prune_curve(
        model, cfg.methods, cfg.sparsities, cfg.scope, cfg.ablations, every=cfg.every, calib_tokens=cfg.calib_tokens,
        precision=cfg.precision, progress=True,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv(out / "curve.csv", res.table), write_csv(out / "curve_runs.csv", res.runs)]
    doc = {"protocol": res.protocol, "dense_perplexity": res.dense_perplexity, "dense_fp32": res.dense_fp32,
           "dense_bf16": res.dense_bf16, "recommended": res.recommended, "timings": res.timings, "config": asdict(cfg)}
    files.append(write_json(out / "protocol.json", doc))
    files.append(curves.plot_curve(res, out / "curve.png"))
    for row in res.table.itertuples():
        spread = f" (seeds {row.perplexity_min:.1f}-{row.perplexity_max:.1f})" if row.n_seeds > 1 else ""
        log(f"{row.method:12s} {row.ablation:5s} {row.sparsity:.2f}: ppl {row.perplexity:10.2f}  x{row.ratio:.2f}{spread}")
    log(f"dense {res.dense_perplexity:.2f}; recommended {res.recommended}; wrote {len(files)} files to {out}")
    return {"files": [str(f) for f in files], "recommended": res.recommended, "dense_perplexity": res.dense_perplexity}


@dataclass
class PruneConfig:
    """Settings of ``neuronscope-tl prune``.

    Args:
        model: HF model id or local directory; None for the embedded default.
        method: ranking method; None for the project's recommendation (the best on its own curve).
        sparsity: fraction of MLP neurons to remove, in [0, 1).
        scope: ``per_layer`` (one smaller intermediate size) or ``global`` (masked checkpoint, same shapes).
        ablation: ``zero`` or ``mean`` (mean activation folded into an output bias); None: the recommendation's.
        out: a new or empty directory (or any directory with ``overwrite``).
        overwrite: replace a non-empty ``out``.
        calib_tokens: calibration tokens (scores, means and the least-squares refit).
        evaluate: also measure dense and pruned perplexity on the default protocol (bf16, every third window).
    """

    sparsity: float = 0.2
    out: str = "neuronscope_pruned"
    model: Optional[str] = None
    method: Optional[str] = None
    scope: str = "per_layer"
    ablation: Optional[str] = None
    overwrite: bool = False
    calib_tokens: int = 8192
    evaluate: bool = True

    def __post_init__(self):
        from .impact import check_ablation
        from .surgery import check_out_dir

        c = _curves()
        if self.method is None:
            self.method = c.RECOMMENDED_METHOD
            self.ablation = self.ablation or c.RECOMMENDED_ABLATION
        self.ablation = self.ablation or "zero"
        c.check_method(self.method)
        c.check_sparsity(self.sparsity)
        c.check_scope(self.scope)
        check_ablation(self.ablation)
        check_out_dir(self.out, self.overwrite)


def add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model id or local directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--method", default=None, help="ranking method (default: the project's recommended method)")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of MLP neurons to remove, in [0, 1)")
    p.add_argument("--scope", default="per_layer", help="per_layer or global")
    p.add_argument("--ablation", default=None, help="zero or mean (default: the recommended method's)")
    p.add_argument("--out", required=True, help="new or empty output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the perplexity check")


def run_prune(cfg: PruneConfig, log=print) -> dict:
    """Select, prune, save the smaller model and write ``pruning_report.json`` beside its files."""
    from . import curves, models, surgery
    from .export import write_json

    model = models.load_model(cfg.model)
    cal = curves.calibrate(model, calib_tokens=cfg.calib_tokens, with_grams=cfg.method == "obs")
    spec = curves.build_spec(model, cal, cfg.method, cfg.sparsity, cfg.scope, cfg.ablation)
    if spec is None:
        raise ValueError(f"sparsity {cfg.sparsity} removes no neuron; use a sparsity in (0, 1) large enough for one neuron.")
    report = {"method": cfg.method, "ablation": cfg.ablation, "scope": cfg.scope, "sparsity": cfg.sparsity}
    if cfg.evaluate:
        wins = curves.eval_windows(model, None, curves.DEFAULT_WINDOW, curves.DEFAULT_EVERY)
        dense = curves.perplexity(*curves.window_nll(model, wins, bf16=True))
        pruned = curves.perplexity(*curves.window_nll(model, wins, surgery.simulation_hooks(spec), bf16=True))
        report.update({"dense_perplexity": dense, "pruned_perplexity": pruned, "ratio": pruned / dense,
                       "protocol": curves.protocol_record(model, wins, 0, "bf16-autocast", cal.record)})
    result = surgery.prune_model(model, None, cfg.ablation, out=cfg.out, overwrite=cfg.overwrite, spec=spec)
    report["model"] = result.to_dict()
    write_json(Path(cfg.out) / "pruning_report.json", report)
    if result.masked:
        log("widths differ per layer: wrote a MASKED checkpoint of the original shapes (pruned weights set to zero); it is not smaller.")
    log(f"pruned {result.n_pruned} neurons ({cfg.method}, {cfg.ablation}, {cfg.scope}); d_mlp {result.d_mlp_before} -> {result.d_mlp_after}; "
        f"parameters {result.parameters_before:,} -> {result.parameters_after:,}; file {result.file_bytes_before/1e6:.1f} -> {result.file_bytes_after/1e6:.1f} MB; "
        f"latency {result.latency_s_before*1e3:.0f} -> {result.latency_s_after*1e3:.0f} ms / {result.latency_tokens} tokens")
    if cfg.evaluate:
        log(f"perplexity {report['dense_perplexity']:.2f} -> {report['pruned_perplexity']:.2f} (x{report['ratio']:.3f})")
    return report


COMMANDS = {
    "analyze": (add_analyze_args, AnalyzeConfig, run_analyze, "run the seed's whole workflow and write a report"),
    "serve": (add_serve_args, ServeConfig, run_serve, "start the web app (Gradio demo and REST API) on 127.0.0.1"),
    "score": (add_score_args, ScoreConfig, run_score, "score every neuron in one pass and validate against exact ablation"),
    "curve": (add_curve_args, CurveConfig, run_curve, "pruning curves of every method against random"),
    "prune": (add_prune_args, PruneConfig, run_prune, "write a physically smaller pruned model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronscope-tl", description="Find prunable MLP neurons and prove it by measurement.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    return parser


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse ``argv`` into (command name, config dataclass). Raises ValueError on invalid values."""
    ns = vars(build_parser().parse_args(argv))
    name = ns.pop("command")
    config_cls = COMMANDS[name][1]
    return name, config_cls(**ns)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        name, cfg = parse_args(argv)
        COMMANDS[name][2](cfg)
    except (ValueError, RuntimeError, OSError) as exc:  # OSError: a full disk or a refused write, say
        print(f"neuronscope-tl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
