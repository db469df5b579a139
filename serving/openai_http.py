# OpenAI-compatible HTTP: POST /v1/completions and /v1/chat/completions, whole or streamed as server-sent events.
"""The wire formats are OpenAI's (and vLLM's, for the extras):

- completions: one choice per prompt and sample (``index = prompt * n + sample``); ``echo`` prefixes the
  prompt; ``logprobs=k`` gives ``{text_offset, token_logprobs, tokens, top_logprobs}`` (-inf as -9999.0).
- chat: the messages rendered by the chat template; streamed, each choice's first chunk is the
  ``{"role": "assistant", "content": ""}`` delta, sent with its first generated token (not on admission, which
  would fake the time to first token), then content deltas, the last with its ``finish_reason``.
- ``stream_options.include_usage``: a last chunk with ``"choices": []`` and the usage, before ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from .auth import require_api_key
from .errors import bad_request
from .generation import ChoiceDelta, Generation, RequestStream
from .responses import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatLogprobs,
                        ChatMessageOut, CompletionChoice, CompletionLogprobs, CompletionResponse, DeltaMessage,
                        TokenLogprob, TopLogprob, Usage)
from .schemas import ChatCompletionRequest, CompletionRequest
from .streaming import DONE, merge, sse, sse_response, until_disconnect

router = APIRouter(dependencies=[Depends(require_api_key)])
NEG_INF = -9999.0  # what -inf logprobs are reported as (JSON has no infinity)


def _lp(value: float) -> float:
    return value if value > NEG_INF else NEG_INF


def _top(step: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely alternatives of one step (the dict also holds the sampled token)."""
    return sorted(step.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(gen: Generation, d: ChoiceDelta, k: int, offset: int) -> tuple[CompletionLogprobs, int]:
    out = CompletionLogprobs()
    for token, step in zip(d.token_ids, d.logprobs):
        text = gen.token_text(token)
        out.text_offset.append(offset)
        out.tokens.append(text)
        out.token_logprobs.append(_lp(step.get(token, NEG_INF)))
        out.top_logprobs.append({gen.token_text(t): _lp(v) for t, v in _top(step, k)})
        offset += len(text)
    return out, offset


def chat_logprobs(gen: Generation, d: ChoiceDelta, k: int) -> ChatLogprobs:
    content = []
    for token, step in zip(d.token_ids, d.logprobs):
        text = gen.token_text(token)
        tops = [TopLogprob(token=(s := gen.token_text(t)), logprob=_lp(v), bytes=list(s.encode()))
                for t, v in _top(step, k)]
        content.append(TokenLogprob(token=text, logprob=_lp(step.get(token, NEG_INF)), bytes=list(text.encode()),
                                    top_logprobs=tops))
    return ChatLogprobs(content=content)


OPTIONAL = ("stop_reason", "token_ids", "prompt_token_ids")  # vLLM's extras: sent only when set


def _clean(model) -> dict:
    """A response as JSON data: OpenAI's null fields kept, vLLM's unset extras and an unset usage left out."""
    data = model.model_dump(mode="json")
    if data.get("usage") is None:
        data.pop("usage", None)
    for choice in data["choices"]:
        for key in OPTIONAL:
            if choice.get(key, 0) is None:
                del choice[key]
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}  # OpenAI omits them
    return data


def _chunk(model) -> str:
    return sse(_clean(model))


def _gen(request: Request) -> Generation:
    return request.app.state.generation


async def _start_all(gen: Generation, rid: str, prompts: list[list[int]], make_params) -> list[RequestStream]:
    """One engine request per prompt; if one is refused, the ones already started are aborted."""
    streams: list[RequestStream] = []
    try:
        for i, ids in enumerate(prompts):
            streams.append(await gen.start(rid if len(prompts) == 1 else f"{rid}-{i}", ids, make_params(ids)))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


# ---------------------------------------------------------------------------------------------- completions

@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    gen = _gen(request)
    gen.check_model(body.model)
    prompts = body.prompts()
    if len(prompts) > gen.settings.max_prompts:
        raise bad_request(f"{len(prompts)} prompts in one request; this server takes at most "
                          f"server.max_prompts={gen.settings.max_prompts}", "prompt")
    ids = [gen.encode(p) for p in prompts]
    texts = [p if isinstance(p, str) else (gen.decode(p) if body.echo else "") for p in prompts]
    rid = gen.request_id("cmpl")
    streams = await _start_all(gen, rid, ids, lambda p: gen.params(body, gen.max_tokens_for(body.max_tokens, len(p)),
                                                                   body.logprobs))
    created = int(time.time())
    if body.stream:
        return sse_response(_completion_events(gen, body, rid, created, ids, texts, streams))
    return await until_disconnect(request, _completion_response(gen, body, rid, created, ids, texts, streams))


async def _completion_response(gen, body, rid, created, ids, texts, streams) -> JSONResponse:
    try:
        finals = [await stream.collect() for stream in streams]
    finally:
        for s in streams:
            s.close()
    choices, completion = [], 0
    for i, final in enumerate(finals):
        for o in final.outputs:
            prefix = texts[i] if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                d = ChoiceDelta(o.index, o.text, o.token_ids, o.logprobs or [])
                logprobs, _ = completion_logprobs(gen, d, body.logprobs, len(prefix))
            completion += len(o.token_ids)
            choices.append(CompletionChoice(
                index=i * body.n + o.index, text=prefix + o.text, logprobs=logprobs, finish_reason=o.finish_reason,
                stop_reason=o.stop_reason, token_ids=o.token_ids if body.return_token_ids else None,
                prompt_token_ids=ids[i] if body.return_token_ids else None))
    usage = Usage.of(sum(len(p) for p in ids), completion)
    return JSONResponse(_clean(CompletionResponse(id=rid, created=created, model=gen.model_name, choices=choices,
                                                  usage=usage)))


async def _completion_events(gen, body, rid, created, ids, texts, streams) -> AsyncIterator[str]:
    n, prompt_tokens, completion = body.n, sum(len(p) for p in ids), 0
    started: set[int] = set()
    offsets: dict[int, int] = {}
    opts = body.stream_options
    try:
        async for i, deltas in merge(streams):
            for d in deltas:
                index = i * n + d.index
                completion += len(d.token_ids)
                text, first = d.text, index not in started
                if first and body.echo:
                    text = texts[i] + text
                per_token = body.logprobs is not None or body.return_token_ids  # every token needs its chunk
                if not text and d.finish_reason is None and not (per_token and d.token_ids):
                    continue
                started.add(index)
                logprobs = None
                if body.logprobs is not None:
                    start = offsets.get(index, len(texts[i]) if body.echo else 0)
                    logprobs, offsets[index] = completion_logprobs(gen, d, body.logprobs, start)
                choice = CompletionChoice(
                    index=index, text=text, logprobs=logprobs, finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason, token_ids=d.token_ids if body.return_token_ids else None,
                    prompt_token_ids=ids[i] if body.return_token_ids and first else None)
                usage = Usage.of(prompt_tokens, completion) if opts and opts.continuous_usage_stats else None
                chunk = CompletionResponse(id=rid, created=created, model=gen.model_name, choices=[choice],
                                           usage=usage)
                yield _chunk(chunk)
        if opts and opts.include_usage:
            chunk = CompletionResponse(id=rid, created=created, model=gen.model_name, choices=[],
                                       usage=Usage.of(prompt_tokens, completion))
            yield _chunk(chunk)
        yield DONE
    finally:
        for s in streams:
            s.close()


# ---------------------------------------------------------------------------------------------- chat

@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    gen = _gen(request)
    gen.check_model(body.model)
    prompt = gen.render_chat(body.messages, body.add_generation_prompt)
    ids = gen.encode(prompt, param="messages")
    k = (body.top_logprobs or 0) if body.logprobs else None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = gen.params(body, gen.max_tokens_for(requested, len(ids)), k)
    rid = gen.request_id("chatcmpl")
    stream = await gen.start(rid, ids, params)
    created = int(time.time())
    if body.stream:
        return sse_response(_chat_events(gen, body, rid, created, ids, stream, k))
    return await until_disconnect(request, _chat_response(gen, body, rid, created, ids, stream, k))


async def _chat_response(gen, body, rid, created, ids, stream, k) -> JSONResponse:
    final = await stream.collect()
    choices = []
    for o in final.outputs:
        logprobs = None
        if k is not None:
            logprobs = chat_logprobs(gen, ChoiceDelta(o.index, o.text, o.token_ids, o.logprobs or []), k)
        choices.append(ChatChoice(index=o.index, message=ChatMessageOut(content=o.text), logprobs=logprobs,
                                  finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                                  token_ids=o.token_ids if body.return_token_ids else None))
    usage = Usage.of(len(ids), sum(len(o.token_ids) for o in final.outputs))
    response = ChatCompletionResponse(id=rid, created=created, model=gen.model_name, choices=choices, usage=usage,
                                      prompt_token_ids=ids if body.return_token_ids else None)
    data = _clean(response)
    if data["prompt_token_ids"] is None:
        del data["prompt_token_ids"]
    return JSONResponse(data)


def _chat_chunk(gen, rid, created, choice: ChatChunkChoice, usage: Usage | None = None) -> str:
    return _chunk(ChatCompletionChunk(id=rid, created=created, model=gen.model_name, choices=[choice], usage=usage))


async def _chat_events(gen, body, rid, created, ids, stream: RequestStream, k) -> AsyncIterator[str]:
    started: set[int] = set()
    completion, opts = 0, body.stream_options
    try:
        async for deltas in stream:
            for d in deltas:
                completion += len(d.token_ids)
                usage = Usage.of(len(ids), completion) if opts and opts.continuous_usage_stats else None
                if d.index not in started:  # the role chunk goes out with the first generated token
                    started.add(d.index)
                    role = ChatChunkChoice(index=d.index, delta=DeltaMessage(role="assistant", content=""))
                    yield _chat_chunk(gen, rid, created, role, usage)
                per_token = k is not None or body.return_token_ids  # every token needs its chunk
                if not d.text and d.finish_reason is None and not (per_token and d.token_ids):
                    continue
                choice = ChatChunkChoice(
                    index=d.index, delta=DeltaMessage(content=d.text if d.text or d.finish_reason is None else None),
                    logprobs=chat_logprobs(gen, d, k) if k is not None else None, finish_reason=d.finish_reason,
                    token_ids=d.token_ids if body.return_token_ids else None)
                yield _chat_chunk(gen, rid, created, choice, usage)
        if opts and opts.include_usage:
            chunk = ChatCompletionChunk(id=rid, created=created, model=gen.model_name, choices=[],
                                        usage=Usage.of(len(ids), completion))
            yield _chunk(chunk)
        yield DONE
    finally:
        stream.close()


__all__ = ["router"]
