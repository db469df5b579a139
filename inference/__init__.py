# pipeloom.inference: the inference engine (paged KV cache, ragged batches, sampling, detokenization, LLM API).
"""Inference on pipeloom's own models, shaped like vLLM so it feels familiar::

    from pipeloom.inference import LLM, SamplingParams
    llm = LLM(model="llama-tiny")
    out = llm.generate(["def f("], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]

Sampling (``sampling``): per-request params, validated, and a batched sampler whose seeded rows do not
depend on the rest of the batch. Text (``detokenize``): incremental detokenization that never emits half a
character or part of a stop string. Bad requests (``validate``) fail at ``add_request`` with one ValueError.
The engine: ``block_manager`` (paged KV, prefix caching), ``model_runner`` (ragged batches, CUDA graphs),
``engine`` (``LLMEngine``: the loop over the batching policy's Scheduler), ``async_engine`` (``AsyncEngine``),
``llm`` (``LLM``, the offline API).
"""

from .async_engine import AsyncEngine
from .block_manager import BlockManager
from .detokenize import IncrementalDetokenizer
from .engine import LLMEngine
from .llm import LLM
from .model_runner import ModelRunner
from .sampling import Sampler, SamplerOutput, SamplingParams
from .sequence import CompletionOutput, RequestOutput, Sequence
from .speculative_engine import SpeculativeEngine
from .validate import validate_request

__all__ = ["LLM", "AsyncEngine", "BlockManager", "CompletionOutput", "IncrementalDetokenizer",
           "LLMEngine", "ModelRunner", "RequestOutput", "Sampler", "SamplerOutput", "SamplingParams", "Sequence",
           "SpeculativeEngine",
           "validate_request"]
