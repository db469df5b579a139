# The small HTTP routes: /v1/models, /tokenize, /detokenize, /health, /version, /metrics, /engine/stats.
"""``/health`` answers 200 while the engine works and 503 once a step has failed (the engine's state is then
unknown: restart). ``/engine/stats`` gives what a load generator needs to replay a run in the batching
simulator: the policy and its options, the KV pool, and the cost model fitted on the iterations since
``?since=N`` (the ``iterations`` count read before the run).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response

import pipeloom
from pipeloom.schedules.batching import fit_cost_model, fit_error

from .auth import require_api_key
from .errors import APIError
from .generation import Generation
from .responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse
from .schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)])
STARTED = int(time.time())


def _gen(request: Request) -> Generation:
    return request.app.state.generation


@api.get("/v1/models")
async def models(request: Request) -> ModelList:
    gen = _gen(request)
    return ModelList(data=[ModelCard(id=gen.model_name, created=STARTED, root=gen.model_name,
                                     max_model_len=gen.max_model_len)])


@api.get("/v1/models/{model:path}")
async def model(model: str, request: Request) -> ModelCard:
    gen = _gen(request)
    gen.check_model(model)
    return ModelCard(id=gen.model_name, created=STARTED, root=gen.model_name, max_model_len=gen.max_model_len)


@api.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    gen = _gen(request)
    gen.check_model(body.model)
    if body.messages is not None:
        ids = gen.encode(gen.render_chat(body.messages, body.add_generation_prompt), param="messages")
    else:
        ids = gen.encode(body.prompt)
    return TokenizeResponse(count=len(ids), max_model_len=gen.max_model_len, tokens=ids)


@api.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    gen = _gen(request)
    gen.check_model(body.model)
    return DetokenizeResponse(prompt=gen.decode(body.tokens))


@api.get("/engine/stats")
async def engine_stats(request: Request, since: int = Query(0, ge=0)) -> JSONResponse:
    llm = _gen(request).llm
    records = llm.records[since:]
    cost = None
    if len(records) >= 2:
        model = fit_cost_model(records, name="fitted")
        cost = {"a": model.a, "b": model.b, "c": model.c, "d": model.d, "fit_error": fit_error(model, records)}
    bm = llm.block_manager
    return JSONResponse(jsonable_encoder({
        "policy": llm.policy.name, "policy_options": dict(llm.policy.opts), "block_size": bm.block_size,
        "num_blocks": bm.num_blocks, "max_model_len": llm.max_model_len, "vocab_size": llm.config.vocab_size,
        "iterations": len(llm.records), "fitted_iterations": len(records), "cost_model": cost,
        **llm.stats()}))


@router.get("/health")
async def health(request: Request) -> Response:
    dead = _gen(request).dead
    if dead:
        return APIError(503, f"the engine is dead ({dead}); restart the server").response()
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> dict:
    return {"version": pipeloom.__version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = _gen(request).metrics.render()
    return Response(body, media_type=content_type)
