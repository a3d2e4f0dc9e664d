"""The REST API under ``/api/pruning``: Pydantic request models and one :class:`.AppState` call per route.

Status codes: 200 on success; 422 for a malformed body (Pydantic); 400 for a value the library refuses (its
``ValueError`` message is the ``detail``); 413 for a request over a size limit; 409 for an impact export before
any impact analysis; 503 when the model stayed busy longer than the lock timeout. Errors are ``{"detail": str}``
and never carry a traceback.

Routes are plain ``def`` functions, so FastAPI runs them in its thread pool; model work queues on the app's lock.
"""

from __future__ import annotations

import json
from typing import Any, List, Literal, Optional, Union

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from .. import compare
from ..export import to_jsonable
from ..texts import EXAMPLE_TEXTS
from ..candidates import candidates_document
from .state import THIS_MODEL, AppState, Busy, LimitExceeded, NoResultYet

PREFIX = "/api/pruning"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImpactRequest(_Body):
    layer_index: StrictInt = Field(description="MLP layer whose neurons are ablated")
    neuron_indices: List[StrictInt] = Field(description="neurons of that layer, distinct, in [0, d_mlp)")
    input_text: StrictStr = Field(description="the text the impact is measured on")
    ablation: Literal["zero", "mean"] = "zero"

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"layer_index": 0, "neuron_indices": [0, 1, 2], "input_text": EXAMPLE_TEXTS[0]}]},
    )


class ImportanceRequest(_Body):
    layer_index: StrictInt
    input_texts: List[StrictStr]
    top_k: StrictInt = Field(10, description="critical neurons returned")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"layer_index": 0, "input_texts": EXAMPLE_TEXTS}]})


class Candidate(_Body):
    layer_index: StrictInt
    neuron_index: StrictInt


class BatchRequest(_Body):
    pruning_candidates: List[Candidate]
    input_texts: List[StrictStr]
    batch_size: StrictInt = Field(10, description="texts per forward pass")
    ablation: Literal["zero", "mean"] = "zero"

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "pruning_candidates": [{"layer_index": 0, "neuron_index": n} for n in range(3)],
                    "input_texts": EXAMPLE_TEXTS[:2],
                    "batch_size": 10,
                }
            ]
        },
    )


class ExportRequest(_Body):
    type: StrictStr = Field(description="'weight' or 'impact'")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"type": "weight"}, {"type": "impact"}]})


class CompareRequest(_Body):
    models: List[StrictStr] = Field(
        description=f"models to compare, in order: {THIS_MODEL!r} (the app's model), its name, or a "
        "model the app may load (a 400 lists them)"
    )
    methods: List[StrictStr] = Field(
        default_factory=lambda: list(compare.DEFAULT_METHODS), description="pruning methods of the curves"
    )
    sparsities: List[Union[StrictFloat, StrictInt]] = Field(
        default_factory=lambda: list(compare.DEFAULT_SPARSITIES), description="per-layer sparsities in [0, 1)"
    )
    ablation: Literal["zero", "mean"] = compare.DEFAULT_ABLATION
    calib_tokens: Optional[StrictInt] = Field(
        None, description="calibration tokens per model; null: the library's default within the app's limit"
    )
    eval_tokens: Optional[StrictInt] = Field(
        None, description="evaluation tokens per model; null: the library's default within the app's limit"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"models": [THIS_MODEL], "methods": ["wanda", "random"], "sparsities": [0.2]}]},
    )


# ---------------------------------------------------------------------------------------------- documented responses
# Routes return ready JSON (``json_response``: NaN becomes null), so these models only document the responses in
# the OpenAPI schema; the schemathesis test checks every answer against them.


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was refused and why; never a traceback or a local path")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class WeightSummaryResponse(_Out):
    model: str
    total_parameters: int
    overall_sparsity: float
    layers: List[dict]


class CandidatesResponse(_Out):
    threshold: float
    safe_percentile: float
    total_candidates: int
    safe_candidates: int
    limits: str
    candidates: List[dict]


class ImpactResponse(_Out):
    model: str
    layer_index: int
    neuron_indices: List[int]
    impact_score: Optional[float]
    verdict: Literal["safe", "moderate", "high"]
    safe_to_prune: bool
    loss_change: Optional[float]
    top1_agreement: Optional[float]
    activation_changes: List[dict]
    token_kl: List[dict]


class ImportanceResponse(_Out):
    model: str
    layer_index: int
    n_texts: int
    n_tokens: int
    critical_neurons: List[dict]
    neurons: List[dict]


class BatchResponse(_Out):
    model: str
    individual: List[dict]
    cumulative: List[dict]
    recommendations: dict


class ExportResponse(_Out):
    schema_version: str
    kind: str
    model: str
    created: str
    result: Any


class CompareResponse(_Out):
    settings: dict
    table: List[dict]
    models: List[dict]


def errors(*codes: int) -> dict:
    """OpenAPI entries of the error statuses a route can answer (422 is FastAPI's validation error model)."""
    why = {
        400: "a value the library refuses (its ValueError message)",
        409: "an impact export before any impact or batch analysis",
        413: "over a size limit (body, texts, tokens, candidates, batch size, top_k)",
        503: "the model stayed busy past the lock timeout",
    }
    return {code: {"model": ErrorResponse, "description": why[code]} for code in codes}


def get_state(request: Request) -> AppState:
    return request.app.state.neuronscope


def call(fn, *args, **kwargs):
    """Run one state operation, mapping its refusals to HTTP errors with the library's message."""
    try:
        return fn(*args, **kwargs)
    except LimitExceeded as exc:
        raise HTTPException(413, str(exc)) from None
    except NoResultYet as exc:
        raise HTTPException(409, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    except Busy as exc:
        raise HTTPException(503, str(exc)) from None


def json_response(data) -> Response:
    return Response(json.dumps(to_jsonable(data), allow_nan=False), media_type="application/json")


router = APIRouter(prefix=PREFIX, tags=["pruning"])


@router.get("/weight-analysis", responses={200: {"model": WeightSummaryResponse}, **errors(413, 503)})
def weight_analysis(state: AppState = Depends(get_state)):
    """Sparsity and per-layer weight statistics (``overall_sparsity``, ``total_parameters``, ``layers``, ...)."""
    return json_response(call(state.weight_summary))


@router.get("/candidates", responses={200: {"model": CandidatesResponse}, **errors(400, 413, 503)})
def candidates(
    threshold: float = Query(10.0, description="percentile of mean |w| within each layer, in (0, 100]"),
    state: AppState = Depends(get_state),
):
    """Neurons at or below the layer's ``threshold`` percentile of mean |w|, with ``total_candidates``; each carries
    its activation evidence, and ``is_pruning_candidate`` only where that evidence shows a small output (``limits``
    states the rule)."""
    table = call(state.candidates, threshold)
    return json_response(candidates_document(table, threshold))


@router.post("/impact-analysis", responses={200: {"model": ImpactResponse}, **errors(400, 413, 503)})
def impact_analysis(body: ImpactRequest, state: AppState = Depends(get_state)):
    """Simulate pruning the neurons on the text: ``impact_score``, ``verdict``, ``safe_to_prune``, ``loss_change``,
    ``activation_changes`` per downstream layer and ``token_kl`` per token."""
    result = call(state.impact, body.layer_index, body.neuron_indices, body.input_text, body.ablation)
    return json_response(result.to_dict())


@router.post("/neuron-importance", responses={200: {"model": ImportanceResponse}, **errors(400, 413, 503)})
def neuron_importance(body: ImportanceRequest, state: AppState = Depends(get_state)):
    """Per-neuron activation statistics and importance of one layer over the texts, and the critical neurons."""
    result = call(state.importance, body.layer_index, body.input_texts, body.top_k)
    return json_response(
        {
            "model": result.model,
            "layer_index": result.layers[0],
            "n_texts": result.n_texts,
            "n_tokens": result.n_tokens,
            "active_threshold": result.active_threshold,
            "critical_neurons": result.critical,
            "neurons": result.table,
        }
    )


@router.post("/batch-analysis", responses={200: {"model": BatchResponse}, **errors(400, 413, 503)})
def batch_analysis(body: BatchRequest, state: AppState = Depends(get_state)):
    """Each candidate's own impact, the cumulative impact in order, and ``recommendations``."""
    cands = [c.model_dump() for c in body.pruning_candidates]
    result = call(state.batch, cands, body.input_texts, body.batch_size, body.ablation)
    return json_response(result.to_dict())


@router.post("/compare", responses={200: {"model": CompareResponse}, **errors(400, 413, 503)})
def compare_models(body: CompareRequest, state: AppState = Depends(get_state)):
    """The models side by side on the same texts: ``table`` (one row per model, as ``comparison_table``), the
    ``settings`` used and each model's winner and importance summary (the document ``neuronscope-tl compare``
    writes to ``compare_result.json``)."""
    comp = call(state.compare, body.models, body.methods, body.sparsities, body.ablation, body.calib_tokens, body.eval_tokens)
    return json_response(compare.comparison_document(comp))


@router.post("/export", responses={200: {"model": ExportResponse}, **errors(400, 409, 413, 503)})
def export(body: ExportRequest, state: AppState = Depends(get_state)):
    """The JSON document of the weight analysis or of the last impact/batch analysis, as a download."""
    name, doc = call(state.export_document, body.type)
    response = json_response(doc)
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
