# gRPC (grpc.aio, in the server's event loop): unary and server-streaming Generate, Health, ModelInfo, Abort.
"""The service of ``proto/pipeloom_serving.proto`` over the same :class:`Generation` as HTTP, so a request is
checked (the same pydantic bounds as a /v1/jobs body), admitted and sampled exactly as over HTTP: same request,
same seed, same tokens. Errors are gRPC status codes: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED (admission
control), UNAUTHENTICATED (metadata ``authorization: Bearer <key>``), CANCELLED (the request was aborted by an
``Abort`` call), INTERNAL / UNAVAILABLE (the engine failed). A client that cancels its call, or goes away, has
its request aborted in the engine.
"""

from __future__ import annotations

import grpc
from pydantic import ValidationError

import pipeloom

from .auth import key_matches
from .errors import GRPC_CODES, APIError, validation_message
from .generation import ChoiceDelta, Generation
from .grpc_protos import load
from .schemas import JobRequest

SCALARS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "seed", "ignore_eos", "min_tokens", "n", "logprobs", "include_stop_str_in_output")


class GenerationService:
    """The servicer (``pb2_grpc.add_GenerationServicer_to_server`` reads its methods)."""

    def __init__(self, gen: Generation):
        self.gen = gen
        self.pb2, _ = load()
        self.active: dict[str, str] = {}  # client request id -> engine request id
        self.aborted: set[str] = set()  # engine ids ended by an Abort call

    # ------------------------------------------------------------------ helpers

    async def _fail(self, context, err: APIError) -> None:
        await context.abort(getattr(grpc.StatusCode, GRPC_CODES.get(err.status, "INTERNAL")), err.message)

    async def _auth(self, context) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if not key_matches(self.gen.settings.api_key, metadata.get("authorization")):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "invalid or missing API key: send the metadata `authorization: Bearer <key>`")

    def _body(self, request) -> JobRequest:
        s = request.sampling
        body = {name: getattr(s, name) for name in SCALARS if s.HasField(name)}
        if s.stop:
            body["stop"] = list(s.stop)
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise APIError(400, "give a prompt: text or token_ids", param="prompt")
        body["prompt"] = request.text if kind == "text" else list(request.token_ids.ids)
        if request.model:
            body["model"] = request.model
        try:
            return JobRequest.model_validate(body)
        except ValidationError as err:
            message, param = validation_message(err.errors())
            raise APIError(400, message, param=param) from err

    async def _start(self, request, context):
        """(client id, stream) for a request, or the RPC is aborted with the error's status."""
        gen = self.gen
        client_id = request.request_id or gen.request_id("grpc")
        try:
            if client_id in self.active:
                raise APIError(400, f"request_id={client_id!r} is already running; ids must be unique",
                               param="request_id")
            body = self._body(request)
            gen.check_model(body.model)
            ids = gen.encode(body.prompts()[0])
            params = gen.params(body, gen.max_tokens_for(body.max_tokens, len(ids)), body.logprobs)
            stream = await gen.start(f"grpc-{client_id}", ids, params)
        except APIError as err:
            await self._fail(context, err)
        self.active[client_id] = stream.request_id
        return client_id, stream

    def _choice(self, d: ChoiceDelta, k: int | None):
        pb = self.pb2
        logprobs = []
        if k is not None:
            for token, step in zip(d.token_ids, d.logprobs):
                top = sorted(step.items(), key=lambda kv: -kv[1])[:k]
                logprobs.append(pb.TokenLogprobs(token_id=token, logprob=step.get(token, float("-inf")),
                                                 top=[pb.Logprob(token_id=t, logprob=v) for t, v in top]))
        return pb.Choice(index=d.index, text=d.text, token_ids=d.token_ids, finish_reason=d.finish_reason or "",
                         logprobs=logprobs)

    def _usage(self, stream, completion: int):
        prompt = len(stream.prompt_ids)
        return self.pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def _end(self, client_id: str, stream, context) -> None:
        self.active.pop(client_id, None)
        if stream.request_id in self.aborted:
            self.aborted.discard(stream.request_id)
            await context.abort(grpc.StatusCode.CANCELLED, f"request {client_id} was aborted by an Abort call")

    # ------------------------------------------------------------------ the RPCs

    async def Generate(self, request, context):
        await self._auth(context)
        client_id, stream = await self._start(request, context)
        try:
            final = await stream.collect()
        except Exception as err:  # the engine failed
            await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed: {type(err).__name__}: {err}")
        finally:  # also when the client cancelled: collect's exit aborted the request
            stream.close()
            self.active.pop(client_id, None)
        await self._end(client_id, stream, context)
        k = stream.params.logprobs
        choices = [self._choice(ChoiceDelta(o.index, o.text, o.token_ids, o.logprobs or [], o.finish_reason), k)
                   for o in final.outputs]
        return self.pb2.GenerateResponse(request_id=client_id, choices=choices, prompt_token_ids=stream.prompt_ids,
                                         usage=self._usage(stream, sum(len(o.token_ids) for o in final.outputs)))

    async def GenerateStream(self, request, context):
        await self._auth(context)
        client_id, stream = await self._start(request, context)
        k, completion = stream.params.logprobs, 0
        try:
            async with stream:
                async for deltas in stream:
                    completion += sum(len(d.token_ids) for d in deltas)
                    chunk = self.pb2.GenerateChunk(request_id=client_id, choices=[self._choice(d, k) for d in deltas])
                    if stream.finished:
                        chunk.finished = True
                        chunk.usage.CopyFrom(self._usage(stream, completion))
                    if deltas or stream.finished:
                        yield chunk
        except Exception as err:  # the engine failed
            await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed: {type(err).__name__}: {err}")
        finally:  # also when the client cancelled: the stream's exit aborted the request
            self.active.pop(client_id, None)
        await self._end(client_id, stream, context)

    async def Health(self, request, context):
        dead = self.gen.dead
        return self.pb2.HealthResponse(healthy=dead is None, status="ok" if dead is None else f"engine dead: {dead}")

    async def ModelInfo(self, request, context):
        await self._auth(context)
        gen, llm = self.gen, self.gen.llm
        return self.pb2.ModelInfoResponse(
            model=gen.model_name, max_model_len=gen.max_model_len, vocab_size=llm.config.vocab_size,
            policy=llm.policy.name, block_size=llm.block_manager.block_size, num_blocks=llm.block_manager.num_blocks,
            has_tokenizer=gen.tokenizer is not None, version=pipeloom.__version__)

    async def Abort(self, request, context):
        await self._auth(context)
        engine_id = self.active.get(request.request_id)
        if engine_id is None:
            return self.pb2.AbortResponse(found=False)
        self.aborted.add(engine_id)
        await self.gen.abort(engine_id)
        return self.pb2.AbortResponse(found=True)


async def start_grpc_server(gen: Generation, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server on ``host:port`` (0: a free port) in the running loop, and its bound port."""
    _, pb2_grpc = load()
    limit = gen.settings.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)])
    pb2_grpc.add_GenerationServicer_to_server(GenerationService(gen), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC could not listen on {host}:{port} (server.grpc_port); pick a free port or 0")
    await server.start()
    return server, bound
