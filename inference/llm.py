# The offline API: LLM(model=...).generate(prompts, SamplingParams(...)), shaped like vLLM's.
"""Batch generation in a few lines::

    from pipeloom.inference import LLM, SamplingParams
    llm = LLM(model="llama-tiny")                       # a named config with random weights
    llm = LLM(model="runs/demo-x")                      # a pipeloom-train run or checkpoint directory
    llm = LLM(model="path/to/hf-folder")                # a Hugging Face GPT-2 / Llama folder
    outs = llm.generate(["def f(", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].finish_reason

Prompts are strings (when the model has a tokenizer: a byte tokenizer for the byte-level models and
pipeloom-train runs, the folder's ``tokenizer.json`` for Hugging Face folders) or lists of token ids.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import time
from collections.abc import Sequence as Seq

import torch

from .engine import LLMEngine
from .model_runner import check_verify_attention
from .sampling import SamplingParams
from .sequence import RequestOutput
from .speculative_engine import SPECULATIVE_METHODS, SpeculativeEngine

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """"auto": CUDA with bfloat16 when a GPU is present, else CPU with float32."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return dev, DTYPES[dtype]


def load_model(model: str | torch.nn.Module, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
               tokenizer=None) -> tuple[torch.nn.Module, object, int | None]:
    """(model in eval mode on ``device``/``dtype``, tokenizer or None, EOS id or None) for ``model``: a module,
    a registered config name (random weights from ``seed``), a Hugging Face folder, or a pipeloom-train run
    or checkpoint directory."""
    from pipeloom.data import ByteTokenizer, HFTokenizer
    from pipeloom.models import MODEL_CONFIGS, Transformer, get_model_config, load_hf_checkpoint

    eos = None
    if isinstance(model, torch.nn.Module):
        net = model
    elif model in MODEL_CONFIGS:
        torch.manual_seed(seed)
        net = Transformer(get_model_config(model))
        if tokenizer is None and net.config.vocab_size == 256:
            tokenizer = ByteTokenizer()
    elif os.path.isfile(os.path.join(model, "config.json")):
        net, _ = load_hf_checkpoint(model, dtype=dtype, device=device)
        eos = json.loads(open(os.path.join(model, "config.json")).read()).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        if tokenizer is None and os.path.isfile(os.path.join(model, "tokenizer.json")):
            tokenizer = HFTokenizer(os.path.join(model, "tokenizer.json"))
    elif os.path.isfile(model):  # a quantized model written by pipeloom.inference.quant.save_quantized
        from pipeloom.inference.quant import load_quantized

        net = load_quantized(model, device=device)
        if tokenizer is None and net.config.vocab_size == 256:
            tokenizer = ByteTokenizer()
    elif os.path.isdir(model):
        net, spec = _load_pipeloom_checkpoint(model)
        if tokenizer is None:
            tokenizer = ByteTokenizer() if spec.get("kind") == "byte" else _find_tokenizer(model, spec)
    else:
        from pipeloom.models import model_config_names

        raise ValueError(f"model={model!r} is neither a registered config ({', '.join(model_config_names())}) nor "
                         "a directory (a Hugging Face folder with config.json, or a pipeloom-train run/checkpoint) "
                         "nor a file written by pipeloom.inference.quant.save_quantized")
    net = net.to(device=device, dtype=dtype).eval()
    if hasattr(net, "init_buffers"):
        net.init_buffers()  # rotary tables back in float32 precision after the dtype cast
    return net, tokenizer, eos


def check_quantization(mode: str, group_size: int = 128) -> None:
    """A ValueError naming ``inference.quantization`` / ``inference.quant_group_size`` when they are not valid."""
    from pipeloom.inference.quant import MODES
    from pipeloom.inference.quant.formats import GROUP_SIZES

    if mode not in MODES:
        raise ValueError(f"inference.quantization={mode!r}; choose one of {', '.join(MODES)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"inference.quant_group_size={group_size}; choose one of {GROUP_SIZES}")


def apply_quantization(model: torch.nn.Module, mode: str = "none", group_size: int = 128,
                       quant_head: bool = False) -> torch.nn.Module:
    """``model`` with its linears quantized to ``mode`` (``inference.quantization``: none | int8 | int4 | fp8), in
    place, before the engine captures graphs or compiles; the output head too when ``quant_head``
    (``inference.quant_head``; kept in the model's dtype by default, as gpt-fast does: the logits are the most
    sensitive layer). A model loaded quantized keeps its own recipe (asking for another mode is an error). fp8
    runs rowwise-scaled ``torch._scaled_mm`` on Hopper-class GPUs (compute capability 8.9+) and its float32
    emulation elsewhere (CPU included: the reference path, not fast)."""
    from pipeloom.inference.quant import quantize_model

    check_quantization(mode, group_size)
    loaded = getattr(model, "quant_config", None)
    if loaded is not None and loaded.mode != "none":
        if mode not in ("none", loaded.mode):
            raise ValueError(f"inference.quantization={mode!r} but the model was loaded quantized as "
                             f"{loaded.mode!r}; load its float checkpoint to quantize it another way")
        return model
    if mode != "none" and next(model.parameters()).dtype == torch.float64:
        raise ValueError(f"inference.quantization={mode!r} needs a float32/bfloat16/float16 model, not float64")
    return quantize_model(model, mode, group_size, skip_head=not quant_head)


def _load_pipeloom_checkpoint(path: str):
    from pipeloom.training import latest_checkpoint, load_dense

    for candidate in (path, os.path.join(path, "checkpoints")):
        step = latest_checkpoint(candidate)
        if step is not None or os.path.isfile(os.path.join(candidate, "pipeloom.json")):
            net, manifest = load_dense(step or candidate)
            return net, manifest.get("tokenizer", {})
    raise ValueError(f"model={path!r}: no pipeloom checkpoint (step_N/pipeloom.json) in it or in its checkpoints/ "
                     "folder, and no config.json of a Hugging Face folder")


def _find_tokenizer(path: str, spec: dict):
    """The tokenizer.json whose digest the checkpoint recorded: beside the run, or in pipeloom's cache."""
    from pipeloom.data import HFTokenizer, default_cache_dir

    here = [os.path.join(p, "tokenizer.json") for p in (path, os.path.dirname(os.path.abspath(path)))]
    for candidate in here + sorted(glob.glob(os.path.join(default_cache_dir(), "*", "tokenizer.json"))):
        if os.path.isfile(candidate):
            tok = HFTokenizer(candidate)
            if tok.spec.get("sha256") == spec.get("sha256"):
                return tok
    return None  # prompts must then be token ids


class LLM:
    """A model plus an :class:`LLMEngine`, for offline batch generation (see the module docstring).

    Options: ``policy`` (a batching policy name) and ``token_budget``; ``block_size``, ``num_blocks`` or
    ``gpu_memory_fraction`` for the KV cache; ``dtype``, ``device``; ``seed`` (random weights of a named config
    and the shared sampling stream); ``attention`` ("auto", "torch", "triton"); ``cuda_graphs``; ``compile``
    (``torch.compile`` the decode forward that the CUDA graphs capture: True or a mode; slower start);
    ``overlap`` (prepare the next iteration while the device runs one, for plain greedy requests; "auto": on
    CUDA). ``quantization``: none | int8 | int4 | fp8 weights
    (:func:`apply_quantization`; ``quant_group_size`` columns per int4 scale; ``quant_head``: the output head
    too), applied to the loaded float model before the engine is built. ``model`` may also be a file written by
    ``pipeloom.inference.quant.save_quantized`` (loaded quantized, no float weights materialised).
    ``kv_cache_dtype``: "auto" (the model's dtype) or "fp8" (e4m3 KV cache: about twice the tokens per byte).
    ``speculative``: "none", "ngram" (prompt lookup: ``num_speculative_tokens`` guesses per decode, verified
    in the iteration's forward; :class:`~pipeloom.inference.speculative_engine.SpeculativeEngine`) or "draft"
    (``draft_model`` guesses them: a config name, a pipeloom-train run or checkpoint directory, a Hugging Face
    folder or a module, loaded like ``model`` and run from its own paged KV cache,
    :class:`~pipeloom.inference.spec_draft.CachedDraftProposer`; its vocabulary must be the target's).
    ``verify_attention``: how the verification steps' CUDA graphs attend, "tiles" or "split"
    (:meth:`~pipeloom.inference.model_runner.ModelRunner.verify_forward`).
    """

    def __init__(self, model: str | torch.nn.Module, *, tokenizer=None, dtype: str = "auto", device: str = "auto",
                 seed: int = 0, policy: str = "chunked-prefill", token_budget: int | None = 512,
                 max_num_seqs: int | None = None, block_size: int = 16, num_blocks: int | None = None,
                 gpu_memory_fraction: float = 0.9, enable_prefix_caching: bool = True, attention: str = "auto",
                 cuda_graphs: bool = True, compile: bool | str = False, overlap: bool | str = "auto",
                 eos_token_id: int | None = None, quantization: str = "none", quant_group_size: int = 128,
                 quant_head: bool = False, kv_cache_dtype: str = "auto", speculative: str = "none",
                 num_speculative_tokens: int = 4, draft_model: str | torch.nn.Module | None = None,
                 verify_attention: str = "tiles"):
        if isinstance(model, torch.nn.Module):  # a module keeps its own device and dtype unless asked otherwise
            param = next(model.parameters())
            device = str(param.device) if device == "auto" else device
            dtype = str(param.dtype).removeprefix("torch.") if dtype == "auto" else dtype
        dev, dt = resolve_device_dtype(device, dtype)
        check_quantization(quantization, quant_group_size)  # before loading: a bad value costs nothing
        if speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"inference.speculative={speculative!r}; choose one of {', '.join(SPECULATIVE_METHODS)}")
        check_verify_attention(verify_attention, "inference.verify_attention")  # before loading, as above
        if (speculative == "draft") != (draft_model is not None):
            raise ValueError("inference.speculative='draft' needs inference.draft_model (a config name, pipeloom-train "
                             "run or Hugging Face folder), and inference.draft_model needs speculative='draft'; got "
                             f"speculative={speculative!r}, draft_model={draft_model!r}")
        self.model, self.tokenizer, eos = load_model(model, device=dev, dtype=dt, seed=seed, tokenizer=tokenizer)
        self.model = apply_quantization(self.model, quantization, quant_group_size, quant_head)
        eos = eos if eos_token_id is None else eos_token_id  # an explicit id wins, 0 included
        spec = {} if speculative == "none" else {"num_speculative_tokens": num_speculative_tokens,
                                                 "verify_attention": verify_attention}
        if speculative == "draft":
            from .spec_draft import CachedDraftProposer

            draft, _, _ = load_model(draft_model, device=dev, dtype=dt, seed=seed, tokenizer=self.tokenizer)
            target_vocab, draft_vocab = self.model.config.vocab_size, draft.config.vocab_size
            if draft_vocab != target_vocab:
                raise ValueError(f"inference.draft_model={draft_model!r} has a vocabulary of {draft_vocab} tokens, the "
                                 f"model {target_vocab}: a draft must share the target's tokenizer")
            spec["proposer"] = CachedDraftProposer(draft, block_size=block_size, eos_token_id=eos)
        engine_class = LLMEngine if speculative == "none" else SpeculativeEngine
        self.engine = engine_class(self.model, **spec, tokenizer=self.tokenizer, eos_token_id=eos,
                                   policy=policy, token_budget=token_budget, max_num_seqs=max_num_seqs,
                                   block_size=block_size, num_blocks=num_blocks,
                                   gpu_memory_fraction=gpu_memory_fraction, enable_prefix_caching=enable_prefix_caching,
                                   attention=attention, cuda_graphs=cuda_graphs, compile=compile, overlap=overlap,
                                   seed=seed, kv_cache_dtype=kv_cache_dtype)
        self._ids = itertools.count()
        self.last_run: dict[str, float] = {}

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One finished :class:`RequestOutput` per prompt, in order. ``sampling_params``: one for all, or one
        per prompt. A bad prompt raises ValueError before anything runs."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, Seq) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts; pass one or "
                             "one per prompt")
        params = [SamplingParams() if p is None else p for p in params]
        engine = self.engine
        tokenized = [engine.tokenize(p) for p in prompts]
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for rid, (text, token_ids), p in zip(ids, tokenized, params):
                engine.add_request(rid, text if text is not None else token_ids, p, prompt_ids=token_ids)
                added.append(rid)
        except ValueError:
            for rid in added:
                engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        first_record, start = len(engine.records), time.perf_counter()
        bar = _progress(len(prompts), use_tqdm)
        try:
            while len(results) < len(ids):
                outputs = engine.step(finished_only=True)
                if engine.idle:
                    self._wait(engine)
                for out in outputs:
                    if out.finished and out.request_id in added:
                        results[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for r in results.values() for o in r.outputs)
        self.last_run = {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                         "iterations": len(engine.records) - first_record}
        return [results[rid] for rid in ids]

    @staticmethod
    def _wait(engine: LLMEngine) -> None:
        """Nothing ran: sleep until the policy's next wakeup (dynamic batching's queue delay)."""
        wake = engine.scheduler.next_wakeup(engine.now())
        if wake is None:
            if not engine.has_unfinished():
                raise RuntimeError("generate: requests are missing from the engine (aborted from elsewhere?)")
            raise RuntimeError("the scheduler has waiting requests but schedules nothing and names no wakeup time; "
                               f"policy {engine.policy.name} cannot run them with {engine.block_manager.num_blocks} "
                               "KV blocks")
        time.sleep(max(0.0, min(wake - engine.now(), 1.0)))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="req", disable=not enabled, dynamic_ncols=True)
