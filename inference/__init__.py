# pipeloom.inference: the inference engine (paged KV cache, ragged batches, sampling, detokenization, LLM API).
"""Inference on pipeloom's own models, shaped like vLLM so it feels familiar::

    from pipeloom.inference import SamplingParams, Sampler
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, seed=1)
    out = Sampler(eos_token_id=eos)(logits, [params], prompt_ids=[prompt], output_ids=[[]],
                                    generators=[params.generator(logits.device)])

Sampling (``sampling``): per-request params, validated, and a batched sampler whose seeded rows do not
depend on the rest of the batch. Text (``detokenize``): incremental detokenization that never emits half a
character or part of a stop string. Bad requests (``validate``) fail at ``add_request`` with one ValueError.
"""

from .detokenize import IncrementalDetokenizer
from .sampling import Sampler, SamplerOutput, SamplingParams
from .validate import validate_request

__all__ = ["IncrementalDetokenizer", "Sampler", "SamplerOutput", "SamplingParams", "validate_request"]
