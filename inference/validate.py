# Bad-input checks the engine runs at add_request: one ValueError naming the field and the value, nothing started.
"""``validate_request`` rejects a request before it touches the scheduler or the KV cache, so a bad request
fails alone and the others keep running. The prompt-length message is vLLM's, word for word, so clients
that match on it keep working.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import SamplingParams


def validate_request(prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams, *, vocab_size: int,
                     max_model_len: int, max_seqs_for_n: int | None = None) -> list[int]:
    """Check one request; return its prompt as a list of ints.

    ``prompt_ids``: the tokenized prompt (a list or a 1-D tensor). ``vocab_size``: the model's vocabulary.
    ``max_model_len``: the model's context length; the prompt must leave room for at least one new token
    to be predicted (a prompt of exactly ``max_model_len`` tokens gets one). ``max_seqs_for_n``: how many
    sequences the cache can hold at once (the engine's capacity), which ``params.n`` must not exceed.
    Raises ValueError naming the field and the value.
    """
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params={params!r} must be a SamplingParams")
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must be a 1-D integer tensor, got shape {tuple(prompt_ids.shape)} "
                             f"dtype {prompt_ids.dtype}")
        ids = prompt_ids.tolist()
    elif isinstance(prompt_ids, (str, bytes)):
        raise ValueError(f"prompt_ids={prompt_ids[:40]!r} is text; tokenize it first (or pass token ids)")
    else:
        ids = list(prompt_ids)
    if not ids:
        raise ValueError("prompt is empty (0 tokens); pass at least one token")
    if len(ids) > max_model_len:
        raise ValueError(f"Input length ({len(ids)}) exceeds the model's maximum context length ({max_model_len}). "
                         "Shorten the prompt.")
    for position, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"prompt token {t!r} at position {position} is not an integer token id")
        if not 0 <= t < vocab_size:
            raise ValueError(f"prompt token id {t} at position {position} is outside the vocabulary "
                             f"[0, {vocab_size}); use ids in that range")
    params.validate(vocab_size=vocab_size)
    if max_seqs_for_n is not None and params.n > max_seqs_for_n:
        raise ValueError(f"n={params.n} is more sequences than the KV cache can hold at once ({max_seqs_for_n}); "
                         f"ask for n <= {max_seqs_for_n} or give the cache more blocks")
    return ids
