"""Command line: ``neuronscope-tl <command>``.

Each command parses its arguments into a config dataclass (``parse_args`` is a small testable function) and calls
library functions; no analysis logic lives here.

* ``analyze``: the whole analysis workflow (weight statistics, candidates, impact of the first candidates, neuron
  importance, batch test, export) on the default model and texts, writing report files to ``--out``.
* ``serve``: the web app (Gradio demo at /, the REST API at /api/pruning, docs at /docs), bound to
  127.0.0.1 unless ``--host`` says otherwise.
* ``score``: every neuron scored in one pass (``scoring.score_pass``), the cheap scores validated against exact
  ablation (``scoring.validate_scores``); writes ``scores.csv``, ``scores.json``, ``validation.json`` and
  ``validation_measured.csv`` to ``--out`` and prints the Spearman correlations.
* ``curve``: pruning curves of every method against random (table CSV, protocol JSON, PNG plot).
* ``prune``: a physically smaller Hugging Face model directory (``save_pretrained`` + tokenizer).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import io
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from . import (
    activations,
    candidates,
    compare,
    distill,
    distributed,
    pipelines,
    curves,
    evaluation,
    impact,
    models,
    plots,
    recipes,
    report,
    scores,
    scoring,
    search,
    selection,
    sequential,
    surgery,
    texts,
    weights,
)
from .app.state import AppSettings
from .export import report_document, write_csv, write_json, write_set

DEFAULT_OUT = "neuronscope_report"  # analyze's; every command has its own folder
DEFAULT_SCORE_OUT = "neuronscope_scores"
CONTEXT_WINDOW = 4  # tokens either side of a top-activating token in top_contexts.csv
HUB_HOST = ("huggingface.co", 443)
DEFAULT_MODEL_TEXT = f"the embedded {models.DEFAULT_MODEL_NAME}"


def recommended_method_text() -> str:
    """The help's name for an omitted --method: the recommendation, read when the parser is built."""
    return f"the recommended method, {curves.resolve_method(None, None)[0]}"


def recommended_recipe_text(name: str, with_method: str = "oneshot and the method's own") -> Callable[[], str]:
    """The help's text for an omitted recipe field (--calibration, --refit, --distill): the recommendation's value,
    and what a given --method takes instead."""

    def text() -> str:
        value = getattr(recipes.RECOMMENDED, name)
        return f"the recommendation's, {'none' if value is None else value}; {with_method} with a given --method"

    return text


def recommended_ablation_text() -> str:
    return f"the recommended method's, {curves.resolve_method(None, None)[1]}; zero with a given --method"


# ---------------------------------------------------------------------------------------------- what the user sees


class Heartbeat:
    """The log of one command. Every message is printed at once; when nothing has been printed for ``every``
    seconds, a line says how long the command has been busy since its last message, so no step runs in silence.
    Use it as a context manager (it starts and stops its timer thread)."""

    def __init__(self, log: Callable[[str], None] = print, every: float = 10.0):
        self.log, self.every = log, every
        self.message, self.since = "starting", time.monotonic()
        self.last = self.since
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __call__(self, message: str) -> None:
        with self._lock:
            self.log(message)
            self.message, self.since = message.strip(), time.monotonic()
            self.last = self.since

    def tick(self, *_args, note: Optional[str] = None) -> None:
        """Progress was shown elsewhere (a progress bar): stay quiet for another ``every`` seconds. ``note`` says
        what is being done now, for the next quiet line."""
        with self._lock:
            self.last = time.monotonic()
            if note is not None:
                self.message, self.since = note, self.last

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 2)):
            with self._lock:
                now = time.monotonic()
                if now - self.last >= self.every:
                    self.log(f"  ... still working, {now - self.since:.0f} s since: {self.message}")
                    self.last = now

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fmt_iqr(iqr) -> str:
    """A latency spread (25th, 75th percentile, seconds) as ``a-b ms``."""
    return f"{iqr[0] * 1e3:.0f}-{iqr[1] * 1e3:.0f} ms"


def log_files(files: Sequence, log: Callable[[str], None]) -> List[str]:
    """List every file written, with its size; returns the paths as strings."""
    paths = [str(f) for f in files]
    log(f"wrote {len(paths)} files:")
    for f in paths:
        size = Path(f).stat().st_size if Path(f).is_file() else sum(p.stat().st_size for p in Path(f).rglob("*") if p.is_file())
        log(f"  {f} ({size / 1e6:.2f} MB)" if size >= 1e5 else f"  {f} ({size / 1e3:.1f} kB)")
    return paths


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` (False in offline mode)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline() -> typing.Iterator[None]:
    """Hugging Face's offline mode for the duration: a hub id not in the local cache fails at once, without the
    hub client's retries. The previous setting is restored afterwards."""
    # huggingface_hub reads HF_HUB_OFFLINE when imported; the module constant is what its calls consult.
    import huggingface_hub.constants as hub_constants

    before_env, before = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub_constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


def is_hub_id(name: Optional[str]) -> bool:
    """A ``--model`` that only the Hugging Face hub can provide: neither a built-in name nor a local directory."""
    if name is None:
        return False
    bare = name[len(models.HOOKED_PREFIX) :] if name.startswith(models.HOOKED_PREFIX) else name
    if not bare or bare in models._DEFAULT_ALIASES or bare in models._GEMMA_ALIASES:
        return False
    return not Path(bare).expanduser().exists() and not bare.startswith(("/", ".", "~"))


def load_model_cli(name: Optional[str], trust_remote_code: bool, log: Callable[[str], None], device: str = "cpu"):
    """``models.load_model`` for the command line: says what it loads, fails fast when the hub is unreachable,
    and words a failure in terms of flags (``omit --model``)."""
    log(f"loading {name or models.DEFAULT_MODEL_NAME}")
    offline = is_hub_id(name) and not hub_reachable()
    try:
        with hub_offline() if offline else contextlib.nullcontext():
            return models.load_model(name, trust_remote_code=trust_remote_code, device=device)
    except RuntimeError as exc:
        if not isinstance(exc.__cause__, (OSError, ValueError)):
            raise
        where = (
            "the Hugging Face hub is unreachable from this machine and the model is not in its local cache"
            if offline
            else "it is neither a local directory nor a model the Hugging Face hub provided"
        )
        cause = str(exc.__cause__).strip().splitlines()[0] if str(exc.__cause__).strip() else type(exc.__cause__).__name__
        raise ValueError(
            f"cannot load --model {name}: {where}. Omit --model for the embedded default ({models.DEFAULT_MODEL_NAME}), "
            f"or give a directory holding a saved Hugging Face model and tokenizer. ({cause})"
        ) from None


def machine_load_note() -> str:
    """A sentence about how busy the machine is while timing (1-minute load average against the CPU count)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cpus = os.cpu_count() or 1
    if load <= 0.5 * cpus:
        return f"machine idle enough (load average {load:.1f} on {cpus} CPUs)."
    return (
        f"the machine was busy (load average {load:.1f} on {cpus} CPUs): other jobs slow both runs unevenly, "
        "so compare latencies on an idle machine."
    )


# ---------------------------------------------------------------------------------------------- flags from configs


def check_paths(out: str, texts: Optional[str] = None) -> None:
    """``--out`` must be a directory or absent; ``--texts``, when given, an existing file."""
    if texts is not None and not Path(texts).is_file():
        raise ValueError(f"--texts {texts}: no such file.")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} exists and is not a directory.")


def arg_docs(cls) -> Dict[str, str]:
    """``{field: help}`` from the "Args:" section of a config dataclass's docstring (Google style)."""
    docs: Dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    inside, current = False, None
    for line in lines:
        stripped = line.strip()
        if stripped == "Args:":
            inside = True
            continue
        if not inside:
            continue
        if not stripped:
            if docs:
                break
            continue
        match = re.match(r"(\w+): (.*)", stripped)
        if match and len(line) - len(line.lstrip()) <= 8:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current:
            docs[current] += " " + stripped
    return docs


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "none"
    return "none" if value is None else str(value)


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field of the config dataclass ``cls`` (nested dataclass fields contribute their own
    fields), with the type, default and help text the dataclass declares. ``metadata`` may give ``required`` or
    ``choices`` (a list, or a function returning one; shown in the help) or ``repeat`` (the flag may be given
    several times); booleans that default to False are switches, those that default to True get ``--no-...``."""
    hints = typing.get_type_hints(cls)
    docs = arg_docs(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            add_config_flags(parser, kind)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        text = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        if kind is bool:
            if default:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=f"{text} (default: on)"
                )
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=f"{text} (default: off)")
            continue
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if typing.get_origin(kind) is typing.Union else kind
        convert = {List[float]: _floats, List[str]: _names}.get(base, base)
        required = f.metadata.get("required", False)
        described = f.metadata.get("default_text")  # a default that None stands for, named in the help
        described = described() if callable(described) else described
        shown = "required" if required else f"default: {described or _shown(default)}"
        if "choices" in f.metadata:  # listed in the help; the config's own check refuses others with a ValueError
            choices = f.metadata["choices"]
            choices = choices() if callable(choices) else choices  # a callable: read when the parser is built
            shown = f"one of {', '.join(choices)}; {shown}"
        if f.metadata.get("repeat"):  # NAME=FILE given once per set
            parser.add_argument(flag, dest=f.name, action="append", default=[], help=f"{text} (repeatable; {shown})")
            continue
        parser.add_argument(
            flag, dest=f.name, type=convert, default=None if required else default, required=required, help=f"{text} ({shown})"
        )


def config_from_args(cls, values: dict):
    """Build the config dataclass ``cls`` from parsed flags (nested dataclasses from their own fields)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = config_from_args(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


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

    model: Optional[str] = field(default=None, metadata={"default_text": DEFAULT_MODEL_TEXT})
    texts: Optional[str] = None
    out: str = DEFAULT_OUT
    threshold: float = 10.0
    n_candidates: int = 5
    max_texts: int = 4
    batch_size: int = 1
    ablation: str = field(default="zero", metadata={"choices": ["zero", "mean"]})
    trust_remote_code: bool = False

    def __post_init__(self):
        weights.check_percentile(self.threshold)
        impact.check_ablation(self.ablation)
        texts.check_batch_size(self.batch_size)
        if self.n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {self.n_candidates}.")
        if self.max_texts < 1:
            raise ValueError(f"max_texts must be >= 1, got {self.max_texts}.")
        check_paths(self.out, self.texts)


def run_analyze(cfg: AnalyzeConfig, log=print) -> dict:
    """Run the analysis workflow and write the report files (JSON, CSV, ``report.html``); returns the summary
    written to ``report.json``. Each candidate's impact is measured once, by the batch test."""

    t0 = time.perf_counter()
    timings = {}
    out = Path(cfg.out)
    model = load_model_cli(cfg.model, cfg.trust_remote_code, log)
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
    log("weight statistics")
    wa = weights.analyze_weights(model)
    files = [str(p) for p in weights.export_weights(wa, out / "weight_analysis.json")]
    timings["weights_s"] = time.perf_counter() - t
    log(
        f"  {wa.total_parameters:,} parameters, sparsity {wa.overall_sparsity:.4%} exactly zero, {wa.near_zero_fraction:.2%} |w| < {wa.near_zero_threshold}"
    )

    t = time.perf_counter()
    log(f"candidates at or below the {cfg.threshold:g}th percentile of mean |w|, with their activation evidence")
    cands = candidates.assess_candidates(model, cfg.threshold, calib_texts=calib, weight_table=wa.neurons)
    files.append(str(write_csv(out / "candidates.csv", cands)))
    first = candidates.first_candidates(cands, cfg.n_candidates)
    if first.empty:
        first = candidates.first_candidates(cands, cfg.n_candidates, safe_only=False)
    pairs = [(int(r.layer), int(r.neuron)) for r in first.itertuples()]
    timings["candidates_s"] = time.perf_counter() - t
    safe_rule = candidates.WEIGHT_ONLY_LIMITS.format(safe=candidates.DEFAULT_SAFE_PERCENTILE)
    log(f"  {len(cands)} candidates, {int(cands['is_pruning_candidate'].sum())} flagged safe by their activation evidence")
    log("  " + safe_rule)

    t = time.perf_counter()
    log(f"neuron importance over {len(calib)} texts")
    imp = activations.neuron_importance(
        model, calib, batch_size=cfg.batch_size, max_tokens=activations.DEFAULT_CALIB_TOKENS, progress=True
    )
    files.append(str(write_csv(out / "neuron_importance.csv", imp.table)))
    imp_doc = report_document(
        "neuron_importance",
        imp.model,
        {"active_threshold": imp.active_threshold, "layers": imp.layers},
        {"n_texts": imp.n_texts, "n_tokens": imp.n_tokens},
        {"critical": imp.critical},
    )
    files.append(str(write_json(out / "neuron_importance.json", imp_doc)))
    timings["importance_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"impact of {len(pairs)} candidates, each alone and the first k together ({cfg.ablation} ablation, {len(evalt)} texts)")
    batch = impact.batch_analysis(model, pairs, evalt, cfg.batch_size, cfg.ablation, calib_texts=calib, progress=True)
    files += [str(p) for p in impact.export_impact(batch, out / "batch_analysis.json")]
    timings["batch_s"] = time.perf_counter() - t
    for r in batch.individual.itertuples():
        log(
            f"  {r.label}: {r.impact_score:.4f} nats ({r.verdict}), loss change {r.loss_change:+.4f}, top-1 {r.top1_agreement:.3f}"
        )
    rec = batch.recommendations
    log(
        f"  {len(rec['safe_to_prune'])} safe, {len(rec['moderate'])} moderate, {len(rec['risky_to_prune'])} risky; "
        f"cumulative impact {rec['cumulative_impact']:.4f} ({rec['cumulative_verdict']}), safe prefix {rec['max_safe_prefix']}"
    )

    log("report.html")
    html_path = out / "report.html"
    report.write_report(
        html_path,
        f"{models.model_name(model)}: which MLP neurons can be pruned?",
        report.analyze_sections(wa, cands, batch, imp, safe_rule),
        files,
    )
    files.append(str(html_path))
    timings["total_s"] = time.perf_counter() - t0

    summary = {
        "model": models.model_name(model),
        "config": asdict(cfg),
        "overall_sparsity": wa.overall_sparsity,
        "total_parameters": wa.total_parameters,
        "n_candidates": len(cands),
        "n_safe_candidates": int(cands["is_pruning_candidate"].sum()),
        "candidate_limits": safe_rule,
        "impacts": [
            {
                "layer_index": int(r.layer),
                "neuron_indices": [int(r.neuron)],
                "impact_score": float(r.impact_score),
                "verdict": r.verdict,
            }
            for r in batch.individual.itertuples()
        ],
        "recommendations": rec,
        "timings": timings,
        "files": files + [str(out / "report.json")],
    }
    write_json(out / "report.json", summary)
    log_files(summary["files"], log)
    log(f"done in {timings['total_s']:.1f} s; open {html_path} in a browser")
    return summary


@dataclass
class ServeConfig:
    """Settings of ``neuronscope-tl serve``.

    Args:
        model: HF model id or local directory; None for the embedded default.
        host: interface to bind; 127.0.0.1 (this machine only) by default. 0.0.0.0 exposes the app to the network.
        port: TCP port; 0 picks a free one.
        trust_remote_code: let transformers run the model repository's own Python code; off unless asked.
        settings: the app's limits (:class:`neuronscope_tl.app.AppSettings`), each its own flag.
    """

    model: Optional[str] = field(default=None, metadata={"default_text": DEFAULT_MODEL_TEXT})
    host: str = "127.0.0.1"
    port: int = 7860
    trust_remote_code: bool = False
    settings: AppSettings = field(default_factory=AppSettings)

    def __post_init__(self):
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ValueError(f"--port must be in 0..65535, got {self.port!r}.")
        if not self.host:
            raise ValueError("--host must not be empty.")


def run_serve(cfg: ServeConfig, log=print) -> None:
    """Load the model, bind the socket (so the address printed is the one bound), and serve until interrupted."""
    from .app.server import bind, create_app, serve  # optional heavy dependency: FastAPI and Gradio, for serve only

    sock = bind(cfg.host, cfg.port)
    model = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    serve(create_app(model, cfg.settings), sock, log=log)


CALIBRATION_SET = "calibration"  # the name of score's validation on its own calibration tokens


@dataclass
class ScoreConfig:
    """Settings of ``neuronscope-tl score``.

    Args:
        model: HF model id or local directory; None for the embedded default.
        calib_texts: a text file (one text per line) to score on; omit for the default mix of news, forum and docs.
        eval_texts: NAME=FILE: also validate the scores on this text set (out-of-domain), repeatable; the scores
            stay those of the calibration texts, the loss change is measured on the set's texts.
        domains: also validate on every default evaluation domain (held-out news, forum and docs; reviews, legal).
        out: output directory.
        max_tokens: calibration tokens for the scoring pass.
        batch_size: texts per forward pass.
        top_k_contexts: top-activating tokens kept per neuron.
        validate_n: neurons per validation set (lowest-scored per score, and random); 0 skips validation.
        validate_tokens: tokens of each validation text set on which the validation ablates exactly.
        ablation: how the validation removes a neuron: zero, or its mean calibration activation.
        scores: comma-separated score columns to validate.
        seed: seed that draws the random validation set.
        trust_remote_code: let transformers run the model repository's own Python code; off unless asked.
        device: where the model runs: cpu, or cuda (under torchrun, each rank's LOCAL_RANK GPU).
    """

    model: Optional[str] = field(default=None, metadata={"default_text": DEFAULT_MODEL_TEXT})
    calib_texts: Optional[str] = None
    eval_texts: List[str] = field(default_factory=list, metadata={"repeat": True})
    domains: bool = False
    out: str = DEFAULT_SCORE_OUT
    max_tokens: int = 2048
    batch_size: int = 1
    top_k_contexts: int = 8
    validate_n: int = 200
    validate_tokens: int = 256
    ablation: str = field(default="zero", metadata={"choices": ["zero", "mean"]})
    scores: str = ",".join(scoring.CHEAP_SCORES)
    seed: int = 0
    trust_remote_code: bool = False
    device: str = field(default="cpu", metadata={"choices": list(distributed.DEVICES)})

    def __post_init__(self):
        distributed.check_device(self.device)
        impact.check_ablation(self.ablation)
        texts.check_batch_size(self.batch_size)
        for name in ("max_tokens", "top_k_contexts", "validate_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.validate_n < 0 or self.validate_n == 1:
            raise ValueError(f"validate_n must be 0 (skip) or >= 2, got {self.validate_n}.")
        unknown = [s for s in self.score_list() if s not in scoring.SCORE_COLUMNS]
        if unknown or not self.score_list():
            raise ValueError(f"unknown score(s) {unknown or self.scores!r}; choose from {', '.join(scoring.CHEAP_SCORES)}.")
        if (self.eval_texts or self.domains) and not self.validate_n:
            raise ValueError("--eval-texts and --domains choose where the scores are validated; they need --validate-n >= 2.")
        check_paths(self.out)
        _, calibration_domains = pipelines.calibration_texts_for(self.calib_texts)  # bad files fail before any work
        sets = pipelines.evaluation_sets_for(self.eval_texts, calibration_domains, defaults=self.domains)
        if any(s.name == CALIBRATION_SET for s in sets):
            raise ValueError(f"the name {CALIBRATION_SET!r} is the calibration texts' own validation; name the set otherwise.")

    def score_list(self) -> List[str]:
        return [s.strip() for s in self.scores.split(",") if s.strip()]


def run_score(cfg: ScoreConfig, log=print) -> dict:
    """Score every neuron, validate the scores on the calibration tokens and on each evaluation set, then write
    every file as one set (nothing is written when any step fails); returns the summary in ``score_report.json``."""

    t0 = time.perf_counter()
    out = Path(cfg.out)
    calib, calibration_domains = pipelines.calibration_texts_for(cfg.calib_texts)
    sets = pipelines.evaluation_sets_for(cfg.eval_texts, calibration_domains, defaults=cfg.domains)
    scores = cfg.score_list()
    model = load_model_cli(cfg.model, cfg.trust_remote_code, log, cfg.device)
    t = time.perf_counter()
    log(f"scoring every neuron over {cfg.max_tokens} tokens (one forward and backward per text)")
    result = scoring.score_pass(model, calib, cfg.batch_size, cfg.max_tokens, cfg.top_k_contexts, progress=True)
    score_s = time.perf_counter() - t
    log(f"scored {len(result.table)} neurons over {result.n_tokens} tokens in {score_s:.1f} s")
    settings = asdict(cfg)
    name = models.model_name(model)
    log(f"decoding the top {cfg.top_k_contexts} contexts of every neuron")
    files = {
        out / "scores.csv": result.table,
        out / "top_contexts.csv": contexts_table(result, CONTEXT_WINDOW),
        out / "scores.json": report_document(
            "neuron_scores", name, settings, {"n_texts": len(result.token_lists), "n_tokens": result.n_tokens}, result.table
        ),
    }
    summary = {"model": name, "config": settings, "score_s": score_s, "n_tokens": result.n_tokens}
    if cfg.validate_n:
        t = time.perf_counter()
        validations = {}
        for set_name, set_texts, table in [(CALIBRATION_SET, calib, None)] + [(s.name, s.texts, result.table) for s in sets]:
            log(
                f"validating {', '.join(scores)} on {set_name}: exact {cfg.ablation} ablation of up to "
                f"{cfg.validate_n * (len(scores) + 1)} neurons, one at a time, over {cfg.validate_tokens} tokens"
            )
            validations[set_name] = scoring.validate_scores(
                model,
                table,
                set_texts,
                cfg.validate_n,
                scores,
                cfg.ablation,
                cfg.validate_tokens,
                cfg.seed,
                calib_texts=calib,
                progress=True,
            )
        summary["validate_s"] = time.perf_counter() - t
        files[out / "validation_measured.csv"] = pd.concat(
            [v.measured.assign(set=k) for k, v in validations.items()], ignore_index=True
        )
        doc = {k: val for k, val in validations[CALIBRATION_SET].to_dict().items() if k != "measured"}
        doc["sets"] = {
            k: {"spearman_candidates": v.spearman_candidates, "spearman_random": v.spearman_random, "n_tokens": v.n_tokens}
            for k, v in validations.items()
        }
        doc["sets_record"] = [s.record() for s in sets]
        files[out / "validation.json"] = report_document(
            "score_validation", name, settings, {"n_tokens": validations[CALIBRATION_SET].n_tokens}, doc
        )
        summary["spearman_candidates"] = validations[CALIBRATION_SET].spearman_candidates
        summary["spearman_random"] = validations[CALIBRATION_SET].spearman_random
        summary["validation_sets"] = doc["sets"]
        for set_name, v in validations.items():
            where = "the calibration tokens" if set_name == CALIBRATION_SET else f"set {set_name} (scores from calibration)"
            log(f"Spearman rho with the exact loss change on {where} ({cfg.ablation} ablation, {v.n_tokens} tokens):")
            log(f"  {'score':<14}{'lowest ' + str(v.n):>12}{'random ' + str(v.n):>12}")
            for s in scores:
                log(f"  {s:<14}{v.spearman_candidates[s]:>12.3f}{v.spearman_random[s]:>12.3f}")
    summary["total_s"] = time.perf_counter() - t0
    summary["files"] = [str(p) for p in files] + [str(out / "score_report.json")]
    files[out / "score_report.json"] = summary
    out.mkdir(parents=True, exist_ok=True)
    write_set(files)
    log_files(summary["files"], log)
    log(f"done in {summary['total_s']:.1f} s")
    return summary


def contexts_table(result: "scoring.ScorePass", window: int = CONTEXT_WINDOW) -> pd.DataFrame:
    """Every neuron's top-activating tokens from a scoring pass, one row each (highest first within a neuron):
    layer, neuron, rank, activation, text index, position, the token and ``window`` tokens either side."""
    acc = result.accumulator
    value, text, pos = (np.asarray(a) for a in (acc.top_value, acc.top_text, acc.top_pos))  # [layers, k, d_mlp]
    layer, rank, neuron = np.nonzero(text >= 0)
    pieces = {}

    def piece(i: int) -> str:
        if i not in pieces:
            pieces[i] = result.tokenizer.decode([i])
        return pieces[i]

    ids = [t.tolist() for t in result.token_lists]
    t_idx, p_idx = text[layer, rank, neuron], pos[layer, rank, neuron]
    token, left, right = [], [], []
    for t, p in zip(t_idx.tolist(), p_idx.tolist()):
        row = ids[t]
        token.append(piece(row[p]))
        left.append("".join(piece(i) for i in row[max(0, p - window) : p]))
        right.append("".join(piece(i) for i in row[p + 1 : p + 1 + window]))
    table = pd.DataFrame(
        {
            "layer": layer,
            "neuron": neuron,
            "rank": rank + 1,
            "activation": value[layer, rank, neuron],
            "text_index": t_idx,
            "position": p_idx,
            "token": token,
            "left": left,
            "right": right,
        }
    )
    return table.sort_values(["layer", "neuron", "rank"], kind="stable").reset_index(drop=True)


@dataclass
class CurveConfig:
    """Settings of ``neuronscope-tl curve``.

    Args:
        model: HF model id or local directory; None for the embedded default.
        out: output directory for curve.csv, curve_runs.csv, protocol.json and curve.png.
        methods: comma-separated ranking methods (default: every method that needs no gradients; taylor's gradient
            pass triples the calibration time).
        sparsities: comma-separated fractions of MLP neurons in [0, 1).
        scope: per_layer (the same fraction of every layer), global (one ranking over all layers) or owl
            (outlier-weighted per-layer fractions).
        ablations: comma-separated: zero and/or mean (default: the recommended method's).
        every: with --no-domains, score every n-th 512-token window of the Lee evaluation split (3: about 8k tokens).
        domain_windows: 512-token windows of each evaluation domain, spread over the set, that every point is
            measured on (prune reports measure 12).
        calib_texts: a text file (one text per line) to calibrate on; omit for the default mix of news, forum and docs.
        calib_tokens: calibration tokens.
        eval_texts: NAME=FILE, an extra evaluation set measured beside the default domains.
        domains: measure every default evaluation domain separately (--domain-windows windows of 512 tokens
            each); --no-domains measures the Lee evaluation split only (and the NAME=FILE sets, if any).
        precision: auto (bf16 when within 0.5% of fp32 on the dense model), fp32 or bf16.
        trust_remote_code: let transformers run the model repository's own Python code; off unless asked.
        device: where the model runs: cpu, or cuda (under torchrun, each rank's LOCAL_RANK GPU).
        calibration: oneshot (one calibration pass serves every point) or sequential (each point calibrates its layer
            groups on the model pruned so far: a calibration pass per point, per layer scope only).
        refit: with sequential calibration, the least-squares refit: auto (damping chosen on held-out calibration
            domains), none, or a damping such as 0.01.
        distill: epochs of distillation of every point's kept output weights (on --distill-tokens tokens of the
            calibration sources), as ``prune`` does by default (0: none; about 6 minutes per point and epoch on the default model, 2 cores).
        distill_tokens: tokens each distilled point trains on, as ``prune --distill-tokens``.
    """

    model: Optional[str] = field(default=None, metadata={"default_text": DEFAULT_MODEL_TEXT})
    out: str = "neuronscope_curve"
    methods: List[str] = field(default_factory=curves.curve_methods, metadata={"choices": scores.method_names})
    sparsities: List[float] = field(default_factory=lambda: list(curves.DEFAULT_SPARSITIES))
    scope: str = field(default="per_layer", metadata={"choices": list(selection.SCOPES)})
    ablations: List[str] = field(default_factory=lambda: [curves.RECOMMENDED_ABLATION])
    every: int = evaluation.DEFAULT_EVERY
    domain_windows: int = curves.CURVE_DOMAIN_WINDOWS
    calib_texts: Optional[str] = None
    calib_tokens: int = recipes.RECOMMENDED_CALIB_TOKENS
    eval_texts: List[str] = field(default_factory=list, metadata={"repeat": True})
    domains: bool = True
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16"]})
    trust_remote_code: bool = False
    device: str = field(default="cpu", metadata={"choices": list(distributed.DEVICES)})
    calibration: str = field(default="oneshot", metadata={"choices": list(recipes.CALIBRATION_MODES)})
    refit: str = "auto"
    distill: int = 0
    distill_tokens: int = recipes.DISTILL_TOKENS

    def __post_init__(self):
        distributed.check_device(self.device)
        recipes.check_calibration_mode(self.calibration)
        recipes.parse_refit(self.refit)
        distill.check_epochs(self.distill)
        texts.check_int(self.distill_tokens, "distill_tokens", 1)
        if self.calibration == "sequential":
            sequential.check_sequential_scope(self.scope)
        _, calibration_domains = pipelines.calibration_texts_for(self.calib_texts)  # bad files fail before any work
        pipelines.evaluation_sets_for(self.eval_texts, calibration_domains, defaults=self.domains)
        for m in self.methods:
            scores.check_method(m)
        for s in self.sparsities:
            selection.check_sparsity(s)
        selection.check_scope(self.scope)
        for a in self.ablations:
            impact.check_ablation(a)
        if self.every < 1 or self.calib_tokens < 1 or self.domain_windows < 1:
            raise ValueError(
                f"every, calib_tokens and domain_windows must be >= 1, got {self.every}, {self.calib_tokens}, "
                f"{self.domain_windows}."
            )
        check_paths(self.out)


def curve_ticker(log) -> Optional[Callable[[dict], None]]:
    """What a curve calls after each measured point: the heartbeat's tick, naming the last point measured."""
    tick = getattr(log, "tick", None)
    if tick is None:
        return None
    return lambda row: tick(note=f"measuring the curve; last point: {row['method']} ({row['ablation']}) at {row['sparsity']:g}")


def run_curve(cfg: CurveConfig, log=print) -> dict:
    """Measure the curve and write curve.csv, curve_runs.csv, protocol.json and curve.png into ``cfg.out``."""

    model = load_model_cli(cfg.model, cfg.trust_remote_code, log, cfg.device)
    calib, calibration_domains = pipelines.calibration_texts_for(cfg.calib_texts)
    sets = pipelines.evaluation_sets_for(cfg.eval_texts, calibration_domains, defaults=cfg.domains)
    log(f"calibrating on {cfg.calib_tokens} tokens, then measuring dense perplexity; a progress bar follows")
    res = curves.prune_curve(
        model,
        cfg.methods,
        cfg.sparsities,
        cfg.scope,
        cfg.ablations,
        every=cfg.every,
        calib_texts=calib if cfg.calib_texts else None,  # None: the default mix, and its domains as folds
        calib_tokens=cfg.calib_tokens,
        precision=cfg.precision,
        progress=True,
        domains=sets or None,
        domain_windows_max=cfg.domain_windows,
        window=default_window(model),
        on_run=curve_ticker(log),
        sequential=cfg.calibration == "sequential",
        refit=recipes.parse_refit(cfg.refit),
        distill=cfg.distill,
        distill_tokens=cfg.distill_tokens,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv(out / "curve.csv", res.table), write_csv(out / "curve_runs.csv", res.runs)]
    if res.domains is not None:
        files.append(write_csv(out / "curve_domains.csv", res.domains))
    doc = {
        "protocol": res.protocol,
        "dense_perplexity": res.dense_perplexity,
        "dense_fp32": res.dense_fp32,
        "dense_bf16": res.dense_bf16,
        "recommended": res.recommended,
        "timings": res.timings,
        "config": asdict(cfg),
    }
    files.append(write_json(out / "protocol.json", doc))
    files.append(plots.plot_curve(res, out / "curve.png"))
    files.append(
        report.write_report(
            out / "report.html", f"{res.protocol['model']}: pruning curve", report.curve_sections(res), [str(f) for f in files]
        )
    )
    for row in res.table.itertuples():
        spread = f" (seeds {row.perplexity_min:.1f}-{row.perplexity_max:.1f})" if row.n_seeds > 1 else ""
        where = "".join(
            f", x{value:.2f} {label}"
            for value, label in (
                (getattr(row, "ratio_in_domain", None), "in-domain"),
                (getattr(row, "ratio_out_of_domain", None), "out-of-domain"),
            )
            if value is not None and value == value
        )
        log(f"{row.method:12s} {row.ablation:5s} {row.sparsity:.2f}: ppl {row.perplexity:10.2f}  x{row.ratio:.2f}{spread}{where}")
    log(f"dense {res.dense_perplexity:.2f}; recommended {res.recommended}")
    return {"files": log_files(files, log), "recommended": res.recommended, "dense_perplexity": res.dense_perplexity}


@dataclass
class PruneConfig:
    """Settings of ``neuronscope-tl prune``.

    Args:
        sparsity: fraction of MLP neurons to remove, in [0, 1).
        out: a new or empty output directory (or any directory with --overwrite).
        model: HF model id or local directory; omit for the embedded default.
        method: ranking method; omit for the recommended method (chosen on out-of-domain text).
        scope: per_layer (one smaller intermediate size), global (one ranking over all layers) or owl (outlier-weighted
            per-layer fractions); global and owl are stored at the widest layer's width.
        ablation: zero, or mean (mean activation folded into an output bias); omit for the recommendation's.
        overwrite: replace a non-empty output directory.
        calib_texts: a text file (one text per line) to calibrate on; omit for the default mix of news, forum and docs.
        calib_tokens: calibration tokens (scores, means and the least-squares refit).
        eval_texts: NAME=FILE, an extra evaluation set measured beside the default domains.
        evaluate: measure dense and pruned perplexity on every evaluation set before saving (bf16 autocast).
        trust_remote_code: let transformers run the model repository's own Python code; off unless asked.
        device: where the model runs: cpu, or cuda (under torchrun, each rank's LOCAL_RANK GPU).
        calibration: oneshot (every layer measured on the dense model) or sequential (layer groups measured on the
            model pruned so far); omit for the recommendation's.
        refit: least-squares refit of the kept output weights: auto (damping chosen on held-out calibration
            domains; sequential only), none, or a damping such as 0.01; omit for the recommendation's.
        distill: epochs of distillation of the kept output weights and biases against the dense model's
            next-token distributions (0: none; about 6 minutes an epoch on the default model at 64k tokens, 2
            cores); omit for the recommendation's.
        distill_tokens: tokens distillation trains on, from the calibration's sources (its windows first); when a
            source holds too little text, the calibration windows alone.
    """

    sparsity: float = field(default=0.2, metadata={"required": True})
    out: str = field(default="neuronscope_pruned", metadata={"required": True})
    model: Optional[str] = field(default=None, metadata={"default_text": DEFAULT_MODEL_TEXT})
    method: Optional[str] = field(
        default=None, metadata={"choices": scores.method_names, "default_text": recommended_method_text}
    )
    scope: str = field(default="per_layer", metadata={"choices": list(selection.SCOPES)})
    ablation: Optional[str] = field(
        default=None, metadata={"choices": ["zero", "mean"], "default_text": recommended_ablation_text}
    )
    overwrite: bool = False
    calib_texts: Optional[str] = None
    calib_tokens: int = recipes.RECOMMENDED_CALIB_TOKENS
    eval_texts: List[str] = field(default_factory=list, metadata={"repeat": True})
    evaluate: bool = True
    trust_remote_code: bool = False
    device: str = field(default="cpu", metadata={"choices": list(distributed.DEVICES)})
    calibration: Optional[str] = field(
        default=None,
        metadata={"choices": list(recipes.CALIBRATION_MODES), "default_text": recommended_recipe_text("calibration")},
    )
    refit: Optional[str] = field(default=None, metadata={"default_text": recommended_recipe_text("refit")})
    distill: Optional[int] = field(default=None, metadata={"default_text": recommended_recipe_text("distill", "0")})
    distill_tokens: int = recipes.DISTILL_TOKENS

    def __post_init__(self):
        distributed.check_device(self.device)
        recipe = recipes.resolve_recipe(self.method, self.ablation, self.calibration, self.refit, self.distill)
        self.method, self.ablation, self.calibration = recipe.method, recipe.ablation, recipe.calibration
        self.refit = "none" if recipe.refit is None else str(recipe.refit)
        self.distill = recipe.distill
        texts.check_int(self.distill_tokens, "distill_tokens", 1)
        selection.check_sparsity(self.sparsity)
        selection.check_scope(self.scope)
        impact.check_ablation(self.ablation)
        surgery.check_out_dir(self.out, self.overwrite)
        _, domains = pipelines.calibration_texts_for(self.calib_texts)  # unreadable or empty files fail here
        pipelines.evaluation_sets_for(self.eval_texts, domains)


# The forwards save_pruned times per model (its own default, read from its signature: one home for the number).
LATENCY_REPEATS = inspect.signature(surgery.save_pruned).parameters["latency_repeats"].default


def default_window(model) -> int:
    """The evaluation window: 512 tokens, or the model's whole context when it is shorter."""
    return min(evaluation.DEFAULT_WINDOW, int(model.cfg.n_ctx))


def log_domains(evaluation: dict, log) -> None:
    """One line per evaluation set (dense, pruned, ratio), then the geometric means."""
    for s in evaluation["sets"]:
        name = s["name"]
        where = "in-domain" if s.get("in_domain") else "out-of-domain"
        log(
            f"  {name:10s} {where:14s} ppl {evaluation['dense'][name]:8.2f} -> {evaluation['pruned'][name]:8.2f}  "
            f"x{evaluation['ratios'][name]:.3f}  ({s['n_tokens']} tokens, {s['source']})"
        )
    for key in ("in_domain", "out_of_domain", "all"):
        if evaluation[key] is not None:
            log(f"  geometric mean {key.replace('_', '-'):14s} x{evaluation[key]:.3f}")


def run_prune(cfg: PruneConfig, log=print) -> dict:
    """Calibrate, select, measure every evaluation set, prune and save; ``pruning_report.json`` goes beside the model."""
    model = load_model_cli(cfg.model, cfg.trust_remote_code, log, cfg.device)
    calib, domains = pipelines.calibration_texts_for(cfg.calib_texts)
    sets = pipelines.evaluation_sets_for(cfg.eval_texts, domains) if cfg.evaluate else None
    pruned = pipelines.prune_and_save(
        model,
        cfg.sparsity,
        cfg.out,
        cfg.method,
        cfg.scope,
        cfg.ablation,
        calib if cfg.calib_texts else None,
        domains,
        cfg.calib_tokens,
        sets,
        cfg.overwrite,
        log=log,
        calibration_mode=cfg.calibration,
        refit=cfg.refit,
        distill=cfg.distill,
        distill_tokens=cfg.distill_tokens,
    )
    result = pruned.model
    if result.masked:
        log(
            f"widths differ per layer: every layer is stored at the widest layer's width ({result.d_mlp_after}), narrower "
            f"layers padded with zeroed neurons; the file saves what the widest layer saves, not the average."
        )
    log(
        f"pruned {result.n_pruned} neurons ({pruned.method}, {pruned.ablation}, {pruned.scope}); d_mlp {result.d_mlp_before} -> {result.d_mlp_after}; "
        f"parameters {result.parameters_before:,} -> {result.parameters_after:,}; file {result.file_bytes_before / 1e6:.1f} -> {result.file_bytes_after / 1e6:.1f} MB"
    )
    if result.latency_s_before is not None:
        log(
            f"latency, median of {LATENCY_REPEATS} forwards over {result.latency_tokens} tokens: dense "
            f"{result.latency_s_before * 1e3:.0f} ms (IQR {fmt_iqr(result.latency_quartiles_s_before)}), pruned "
            f"{result.latency_s_after * 1e3:.0f} ms (IQR {fmt_iqr(result.latency_quartiles_s_after)}); {machine_load_note()}"
        )
    if pruned.evaluation is not None:
        log_domains(pruned.evaluation, log)
    out = Path(cfg.out)
    report.write_report(
        out / "report.html",
        f"{models.model_name(model)} pruned to {cfg.out}",
        report.prune_sections(pruned),
        sorted(str(f) for f in out.iterdir() if f.is_file()),
    )
    log_files(sorted(f for f in out.iterdir() if f.is_file()), log)
    return pruned.to_dict()


@dataclass
class SearchConfig:
    """Settings of ``neuronscope-tl search``.

    Args:
        loss_budget: allowed relative perplexity increase (0.05 = +5%), on the geometric mean of the out-of-domain sets.
        out: output directory for search.json and search_steps.csv.
        model: HF model id or local directory; omit for the embedded default.
        method: ranking method; omit for the recommended method.
        ablation: zero or mean; omit for the recommendation's.
        scope: per_layer, global or owl.
        calib_texts: a text file (one text per line) to calibrate on; omit for the default mix of news, forum and docs.
        calib_tokens: calibration tokens.
        eval_texts: NAME=FILE, an extra evaluation set measured beside the default domains.
        trust_remote_code: let transformers run the model repository's own Python code; off unless asked.
        device: where the model runs: cpu, or cuda (under torchrun, each rank's LOCAL_RANK GPU).
    """

    loss_budget: float = 0.25
    out: str = "neuronscope_search"
    model: Optional[str] = field(default=None, metadata={"default_text": DEFAULT_MODEL_TEXT})
    method: Optional[str] = field(
        default=None, metadata={"choices": scores.method_names, "default_text": recommended_method_text}
    )
    ablation: Optional[str] = field(
        default=None, metadata={"choices": ["zero", "mean"], "default_text": recommended_ablation_text}
    )
    scope: str = field(default="per_layer", metadata={"choices": list(selection.SCOPES)})
    calib_texts: Optional[str] = None
    calib_tokens: int = recipes.RECOMMENDED_CALIB_TOKENS
    eval_texts: List[str] = field(default_factory=list, metadata={"repeat": True})
    trust_remote_code: bool = False
    device: str = field(default="cpu", metadata={"choices": list(distributed.DEVICES)})

    def __post_init__(self):
        distributed.check_device(self.device)
        self.method, self.ablation = curves.resolve_method(self.method, self.ablation)
        scores.check_method(self.method)
        impact.check_ablation(self.ablation)
        selection.check_scope(self.scope)
        search.check_budget(self.loss_budget)
        check_paths(self.out)
        _, domains = pipelines.calibration_texts_for(self.calib_texts)
        pipelines.evaluation_sets_for(self.eval_texts, domains)


def run_search(cfg: SearchConfig, log=print) -> dict:
    """The largest sparsity within the budget; writes search.json and search_steps.csv into ``cfg.out``."""
    model = load_model_cli(cfg.model, cfg.trust_remote_code, log, cfg.device)
    calib, domains = pipelines.calibration_texts_for(cfg.calib_texts)
    sets = pipelines.evaluation_sets_for(cfg.eval_texts, domains)
    log(f"calibrating on {cfg.calib_tokens} tokens, then searching ({cfg.method}, {cfg.ablation}, budget +{cfg.loss_budget:.0%})")
    res = search.search_pruning(
        model,
        cfg.loss_budget,
        cfg.method,
        cfg.ablation,
        cfg.scope,
        calib_texts=calib,
        calib_tokens=cfg.calib_tokens,
        domains=sets,
        window=default_window(model),
    )
    for row in res.steps.itertuples():
        log(f"  sparsity {row.sparsity:.4f}: x{row.ratio:.3f} {'accepted' if row.accepted else 'over budget'}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {k: v for k, v in res.to_dict().items() if k not in ("spec", "neurons")}
    files = write_set({out / "search.json": {**doc, "config": asdict(cfg)}, out / "search_steps.csv": res.steps})
    log(f"largest sparsity within +{cfg.loss_budget:.0%}: {res.sparsity:.4f} (x{res.perplexity / res.dense_perplexity:.3f})")
    log_files(files, log)
    return doc


@dataclass
class CompareConfig:
    """Settings of ``neuronscope-tl compare``.

    Args:
        models: comma-separated model names (default, gemma-3-270m, an HF id, a local directory, hooked:NAME).
        texts: a text file, one text per line, the evaluation texts of every model; None for the Lee evaluation split.
        out: output directory (table, curves, sensitivity and outlier CSVs, JSON and compare.png).
        methods: comma-separated pruning methods of the curves.
        sparsities: comma-separated per-layer sparsities of the curves.
        ablation: how pruned neurons are replaced: zero or mean.
        layer_sparsity: fraction of one layer's neurons pruned for its sensitivity, in (0, 1).
        outlier_factor: a neuron is an outlier when its peak |activation| is at least this many times the median.
        eval_tokens: evaluation tokens per model (windows spread over the texts).
        calib_tokens: calibration tokens per model (Lee calibration split).
        trust_remote_code: let transformers run the model repository's own Python code; off unless asked.
    """

    models: List[str] = field(default_factory=lambda: ["default", "gemma-3-270m"])
    texts: Optional[str] = None
    out: str = "neuronscope_compare"
    methods: List[str] = field(default_factory=lambda: list(compare.DEFAULT_METHODS), metadata={"choices": scores.method_names})
    sparsities: List[float] = field(default_factory=lambda: list(compare.DEFAULT_SPARSITIES))
    ablation: str = field(default="mean", metadata={"choices": ["zero", "mean"]})
    layer_sparsity: float = compare.DEFAULT_LAYER_SPARSITY
    outlier_factor: float = compare.DEFAULT_OUTLIER_FACTOR
    eval_tokens: int = compare.DEFAULT_EVAL_TOKENS
    calib_tokens: int = compare.DEFAULT_COMPARE_CALIB_TOKENS
    trust_remote_code: bool = False

    def __post_init__(self):
        if not self.models:
            raise ValueError("--models must name at least one model.")
        for m in self.methods:
            scores.check_method(m)
        selection.check_sparsities(self.sparsities)
        impact.check_ablation(self.ablation)
        check_paths(self.out, self.texts)


def run_compare(cfg: CompareConfig, log=print) -> dict:
    """Compare the models side by side and write the comparison into ``cfg.out``; returns the summary table as
    records."""
    loaded = [models.load_model(m, trust_remote_code=cfg.trust_remote_code) if cfg.trust_remote_code else m for m in cfg.models]
    comp = compare.compare_models(
        loaded,
        texts.read_text_file(cfg.texts) if cfg.texts else None,
        methods=cfg.methods,
        sparsities=cfg.sparsities,
        ablation=cfg.ablation,
        layer_sparsity=cfg.layer_sparsity,
        outlier_factor=cfg.outlier_factor,
        eval_tokens=cfg.eval_tokens,
        calib_tokens=cfg.calib_tokens,
        log=log,
    )
    paths = compare.write_comparison(comp, cfg.out)
    table = compare.comparison_table(comp)
    log(table.T.to_string())
    log("wrote " + ", ".join(str(p) for p in paths))
    return {"table": table.to_dict(orient="records"), "files": [str(p) for p in paths]}


COMMANDS = {
    "analyze": (AnalyzeConfig, run_analyze, "weight statistics, candidates, impact, importance and a batch test, as a report"),
    "serve": (ServeConfig, run_serve, "start the web app (Gradio demo and REST API) on 127.0.0.1"),
    "score": (ScoreConfig, run_score, "score every neuron in one pass and validate against exact ablation"),
    "curve": (CurveConfig, run_curve, "pruning curves of every method against random"),
    "search": (SearchConfig, run_search, "the largest sparsity whose out-of-domain perplexity stays within a budget"),
    "prune": (PruneConfig, run_prune, "write a physically smaller pruned model"),
    "compare": (CompareConfig, run_compare, "compare models side by side: curves, layer sensitivity, importance, outliers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronscope-tl", description="Find prunable MLP neurons and prove it by measurement.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_cls, _, help_text) in COMMANDS.items():
        add_config_flags(sub.add_parser(name, help=help_text, description=help_text), config_cls)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse ``argv`` into (command name, config dataclass). Raises ValueError on invalid values."""
    values = vars(build_parser().parse_args(argv))
    name = values.pop("command")
    return name, config_from_args(COMMANDS[name][0], values)


@contextlib.contextmanager
def rank_output(cfg):
    """The config this process runs. Under torchrun rank 0 writes ``--out`` and prints the log; every other rank
    runs the same command (its passes are shared with rank 0) with its output in a scratch directory, removed
    afterwards, and its log silenced."""
    if distributed.is_writer() or not hasattr(cfg, "out"):
        yield cfg
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"neuronscope-rank{distributed.current().rank}-"))
    mine = copy.copy(cfg)  # checked already, by the same checks on every rank
    mine.out = str(scratch / "out")
    # torchrun stops the other ranks with SIGTERM when one fails: exit through the clean-up below
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM)) if main_thread else None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield mine
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        name, cfg = parse_args(argv)  # every input is checked here, before any rank starts working with others
        with rank_output(cfg) as cfg:
            if name == "serve":  # runs until interrupted: its own log, no heartbeat
                COMMANDS[name][1](cfg)
            else:
                with Heartbeat(print) as log:
                    COMMANDS[name][1](cfg, log=log)
    except (ValueError, RuntimeError, OSError) as exc:  # OSError: a full disk or a refused write, say
        where = f" (rank {distributed.current().rank})" if distributed.active() else ""
        print(f"neuronscope-tl{where}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
