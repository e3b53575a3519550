"""LLMEngine: add_request / step / abort. Everything else (LLM, CLI, server) is a loop over step()."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from miaotui.config import CacheConfig, ModelConfig, SchedulerConfig
from miaotui.detokenizer import IncrementalDetokenizer
from miaotui.engine.beam_group import BeamGroup
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.scheduler import Scheduler
from miaotui.errors import PromptTooLongError
from miaotui.loader import (check_model, check_runnable, check_tokenizer, eos_token_ids, load_dummy_model, load_model,
                            resolve_model, tokenizer_source)
from miaotui.loader.dummy import dummy_hf_config
from miaotui.models.registry import model_class
from miaotui.outputs import CompletionOutput, Logprob, RequestOutput
from miaotui.request import EncoderState, Request, RequestStatus
from miaotui.kernels.cpu_build import load_for_device
from miaotui.runner.cpu_allocator import return_large_blocks, settle_after_load
from miaotui.runner.model_runner import ModelRunner
from miaotui.runner.threads import configure_threads
from miaotui.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from miaotui.tokenizer import load_tokenizer


@dataclass(slots=True)
class _ParentRequest:
    """A user request: n child sequences, their detokenizers and their user-facing outputs."""

    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    outputs: list[CompletionOutput] = field(default_factory=list)
    # prompt_logprobs: built once the leader has scored the whole prompt (RequestOutput's shape).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Per completion, what DELTA outputs have handed out: (characters, tokens, finished).
    sent: list[list] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.status.finished for c in self.children)


def resolve_max_model_len(hf_config: Any, requested: int | None) -> int:
    # T5 has no position table (relative buckets); its configs carry the trained length as n_positions.
    limit = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None) or 2048
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len: {requested} exceeds the model's context window of {limit} tokens; "
                         f"give at most {limit} (--max-model-len) or leave it unset")
    return requested


class LLMEngine:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None) -> None:
        self.model_config = model_config
        cache_config = cache_config or CacheConfig()
        scheduler_config = scheduler_config or SchedulerConfig()
        configure_threads(model_config.threads, model_config.tensor_parallel_size)
        return_large_blocks()
        if model_config.load_format == "dummy":
            self._load_dummy(model_config)
        else:
            # Every check that needs no weights and no tokenizer comes first (paths, files,
            # architecture, tensor types, context length): a wrong model fails in a second, not
            # after a tokenizer conversion or a weight load.
            source = resolve_model(model_config.model)
            tok = tokenizer_source(model_config, source)
            checked = check_model(source, model_config)
            if tok is not None:
                check_tokenizer(tok, checked.reader if tok is source else None)
            self.hf_config = checked.hf_config
            self.max_model_len = resolve_max_model_len(self.hf_config, model_config.max_model_len)
            self.model_path = str(source.path)
            load_for_device(model_config.device)  # CPU kernels, before any model is built
            # Not in parallel threads: transformers' lazy module races when two threads import
            # from it at once ("cannot import name 'AutoConfig'", seen loading a folder).
            self.tokenizer = load_tokenizer(str(tok.path), tok.is_gguf) if tok is not None else None
            self.model, self.hf_config = load_model(source, model_config, checked=checked)
            self.eos_token_ids = eos_token_ids(source, self.hf_config, self.tokenizer)
        self.is_encoder_decoder = getattr(self.model, "is_encoder_decoder", False)
        runner_cls = ModelRunner
        if model_config.tensor_parallel_size > 1:
            from miaotui.runner.tensor_parallel import TensorParallelRunner as runner_cls
        self.runner = runner_cls(self.model, model_config, cache_config, self.max_model_len,
                                 scheduler_config.max_num_batched_tokens,
                                 max_num_seqs=scheduler_config.max_num_seqs)
        settle_after_load()
        self.kv = KVCacheManager(self.runner.num_blocks, cache_config.block_size,
                                 cache_config.enable_prefix_caching, windows=self.runner.kv_windows)
        self.scheduler = Scheduler(scheduler_config, self.kv)
        self._parents: dict[str, _ParentRequest] = {}
        self._beam_groups: dict[str, BeamGroup] = {}
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _load_dummy(self, model_config: ModelConfig) -> None:
        """Random weights for a config (loader/dummy.py); the tokenizer given, else the default
        model's (MIAOTUI_MODEL or the embedded one), or none with skip_tokenizer_init (token-id
        prompts, EOS from the config)."""
        self.hf_config = dummy_hf_config(model_config.model)
        self.model_path = str(model_config.model)
        check_runnable(model_class(self.hf_config), model_config)
        self.max_model_len = resolve_max_model_len(self.hf_config, model_config.max_model_len)
        tok = tokenizer_source(model_config, None)
        if tok is not None:
            check_tokenizer(tok)
        load_for_device(model_config.device)  # CPU kernels, before any model is built
        self.tokenizer = load_tokenizer(str(tok.path), tok.is_gguf) if tok is not None else None
        self.model = load_dummy_model(self.hf_config, model_config)
        self.eos_token_ids = eos_token_ids(None, self.hf_config, self.tokenizer)

    # --- requests in -----------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: a text prompt needs a tokenizer, and this engine runs without one "
                             "(skip_tokenizer_init / --skip-tokenizer-init); give token ids (prompt_token_ids)")
        return self.tokenizer.encode(prompt)

    def decode_token(self, token_id: int) -> str | None:
        """One token's text (a logprob's decoded_token); None without a tokenizer."""
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None, cache_salt: str | None = None) -> str:
        """Queue a request; `prompt` is text or token ids. Returns its id. Requests with
        different `cache_salt` never share prefix-cache blocks (e.g. one salt per tenant)."""
        params = params or SamplingParams()
        request_id, text, ids = self._new_request(request_id, prompt)
        self.check_params(params)
        encoder, decoder_prompt, cache_salt = self._decoder_side(ids, cache_salt)
        children = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}-{i}"
            generator = None
            if params.seed is not None:
                # n > 1 children get seed + i: reproducible, yet not n copies of one sample.
                generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            children.append(Request(child_id, decoder_prompt, params, self.eos_token_ids, self.max_model_len,
                                    parent_id=request_id, index=i, generator=generator,
                                    cache_salt=cache_salt, encoder=encoder))
        detoks = [IncrementalDetokenizer(self.tokenizer, decoder_prompt, params.stop_strings,
                                         params.skip_special_tokens) for _ in children]
        outputs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                    cumulative_logprob=0.0 if params.logprobs is not None else None)
                   for i in range(params.n)]
        self._parents[request_id] = _ParentRequest(text, ids, children, detoks, outputs,
                                                   sent=[[0, 0, False] for _ in outputs])
        self.scheduler.add(children[0], children[1:])
        return request_id

    def add_beam_search_request(self, request_id: str | None, prompt: str | list[int],
                                params: BeamSearchParams) -> str:
        """Queue a beam search; its one output arrives when the search has finished."""
        request_id, text, ids = self._new_request(request_id, prompt)
        if params.beam_width > self.scheduler.config.max_num_seqs:
            raise ValueError(
                f"beam_width: {params.beam_width} exceeds max_num_seqs={self.scheduler.config.max_num_seqs}")
        encoder, decoder_prompt, salt = self._decoder_side(ids, None)
        group = BeamGroup(request_id, text, ids, params, self.eos_token_ids, self.max_model_len,
                          decoder_prompt=decoder_prompt, encoder=encoder, cache_salt=salt)
        self._beam_groups[request_id] = group
        self.scheduler.add(group.beams[0])
        return request_id

    def _decoder_side(self, ids: list[int], cache_salt: str | None
                      ) -> tuple[EncoderState | None, list[int], str | None]:
        """(encoder state, the decoder's prompt, prefix-cache salt) of a prompt. Decoder-only: no
        encoder, the prompt itself. Encoder-decoder: the prompt is the encoder's input, the
        decoder starts from its start token, and the salt folds in the encoder input (decoder
        K/V depends on it, so equal decoder tokens under different inputs must never share)."""
        if not self.is_encoder_decoder:
            return None, ids, cache_salt
        digest = hashlib.sha256(repr(ids).encode()).hexdigest()
        # repr: the user's salt None and the string "None" must stay different salts.
        return EncoderState(ids), [self.model.decoder_start_token_id()], f"{cache_salt!r}|encoder:{digest}"

    def prompt_room(self, prompt_len: int) -> int:
        """How many tokens a prompt of prompt_len leaves for output in the context window (the
        decoder's window for encoder-decoder models, whose prompt goes to the encoder)."""
        return self.max_model_len - (1 if self.is_encoder_decoder else prompt_len)

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: limits of this engine and model."""
        if params.n > self.scheduler.config.max_num_seqs:
            raise ValueError(f"n: {params.n} exceeds max_num_seqs={self.scheduler.config.max_num_seqs}")
        vocab = self.hf_config.vocab_size
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias: token ids must be below the vocabulary size {vocab}")
        if params.prompt_logprobs is not None and self.is_encoder_decoder:
            raise ValueError("prompt_logprobs: not supported for encoder-decoder models "
                             "(their prompt is the encoder's input, which the model does not score)")

    def _new_request(self, request_id: str | None, prompt: str | list[int]) -> tuple[str, str | None, list[int]]:
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._parents or request_id in self._beam_groups:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt_ids(ids)
        if self.is_encoder_decoder and len(ids) > self.max_model_len:
            raise PromptTooLongError(f"prompt is {len(ids)} tokens, but the model's encoder takes at most "
                                     f"{self.max_model_len} tokens")
        if not self.is_encoder_decoder and len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt is {len(ids)} tokens, but the model's context is {self.max_model_len} tokens "
                f"(the prompt must leave room for at least one generated token)"
            )
        return request_id, text, ids

    def check_prompt_ids(self, ids: list[int]) -> None:
        """A non-empty list of token ids of this model's vocabulary."""
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.hf_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown or finished ids are ignored."""
        group = self._beam_groups.pop(request_id, None)
        if group is not None:
            group.abort(self.scheduler)
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for child in parent.children:
            self.scheduler.finish(child.request_id, RequestStatus.FINISHED_ABORTED)

    def shutdown(self) -> None:
        """Release what outlives this object otherwise: tensor-parallel worker processes."""
        self.runner.shutdown()

    def has_unfinished_requests(self) -> bool:
        """True while any request is queued, running or has output not yet returned."""
        return bool(self._parents or self._beam_groups)

    # --- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and return the requests that advanced."""
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        sampled, logprobs = result.token_ids, result.logprobs
        if result.prompt_logprobs:  # before update: a request may finish on its first token
            for seq in sched.seqs:
                scored = result.prompt_logprobs.get(seq.request.request_id)
                if scored is not None:
                    seq.request.record_prompt_logprobs(*scored)
        if self.is_encoder_decoder:  # the prompt is the encoder's input, counted as it is encoded
            self.prompt_tokens_total = self.runner.encoder_tokens_total
        else:
            self.prompt_tokens_total += sum(
                min(s.num_new_tokens, max(s.request.num_prompt_tokens - s.start, 0)) for s in sched.seqs
            )
        updated = self.scheduler.update(sched, sampled)
        self.generation_tokens_total += len(updated)
        touched: dict[str, _ParentRequest] = {}
        for request in updated:
            lp = logprobs.get(request.request_id)
            if lp is not None:
                request.output_logprobs.append(lp)
            parent = self._parents.get(request.parent_id)
            if parent is None:
                continue
            self._emit(parent, request)
            touched[request.parent_id] = parent
        results = self._advance_beam_groups(result.beam_logprobs)
        for parent_id, parent in touched.items():
            self._build_prompt_logprobs(parent)
            out = self._output(parent_id, parent)
            if out is not None:
                results.append(out)
            if parent.finished:
                del self._parents[parent_id]
        if not self.scheduler.has_unfinished():
            self.runner.release_step_cache()  # e.g. the last batch's stacked encoder K/V
        return results

    def _advance_beam_groups(self, beam_logprobs: dict[str, torch.Tensor]) -> list[RequestOutput]:
        finished = []
        for beam_id, row in beam_logprobs.items():
            group = self._beam_groups.get(beam_id.rsplit("#beam", 1)[0])
            if group is not None:
                group.add_logprobs(beam_id, row)
        for group_id, group in list(self._beam_groups.items()):
            if group.ready and group.advance(self.scheduler):
                group.abort(self.scheduler)
                del self._beam_groups[group_id]
                finished.append(group.output(self.tokenizer))
        return finished

    def _build_prompt_logprobs(self, parent: _ParentRequest) -> None:
        """Once the leader has scored every prompt token (always before the first output token):
        None for the first token, then per token {its id, then the top k' ids: Logprob}."""
        leader = parent.children[0]
        if (parent.prompt_logprobs is not None or leader.sampling_params.prompt_logprobs is None
                or leader.needs_prompt_logprobs):
            return
        pieces: dict[int, str | None] = {}

        def piece(tid: int) -> str | None:
            if tid not in pieces:
                pieces[tid] = self.decode_token(tid)
            return pieces[tid]

        built: list[dict[int, Logprob] | None] = [None]
        for token, (value, rank, top) in zip(leader.prompt_token_ids[1:], leader.prompt_logprobs):
            entry = {token: Logprob(value, rank=rank, decoded_token=piece(token))}
            for r, (tid, top_value) in enumerate(top):
                if tid not in entry:
                    entry[tid] = Logprob(top_value, rank=r + 1, decoded_token=piece(tid))
            built.append(entry)
        parent.prompt_logprobs = built

    def _emit(self, parent: _ParentRequest, request: Request) -> None:
        detok = parent.detokenizers[request.index]
        detok.add_token(request.output_token_ids[-1])
        if detok.find_stop():
            self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED, detok.stopped_by)
        out = parent.outputs[request.index]
        out.text += detok.delta(request.status.finished)
        out.token_ids.append(request.output_token_ids[-1])
        if out.logprobs is not None and request.output_logprobs:
            sampled_lp, top = request.output_logprobs[-1]
            token = request.output_token_ids[-1]
            entry = {tid: Logprob(val, rank=r + 1, decoded_token=self.decode_token(tid))
                     for r, (tid, val) in enumerate(top)}
            if token not in entry:
                entry[token] = Logprob(sampled_lp, rank=None, decoded_token=self.decode_token(token))
            out.logprobs.append(entry)
            out.cumulative_logprob += sampled_lp
        out.finish_reason = request.finish_reason
        out.stop_reason = request.stop_reason

    def _output(self, parent_id: str, parent: _ParentRequest) -> RequestOutput | None:
        """The request's output of this step, as its params' output_kind asks (None: none now)."""
        kind = parent.children[0].sampling_params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY:
            if not parent.finished:
                return None
            # The parent is dropped after this step: its outputs are handed over, not copied.
            return RequestOutput(parent_id, parent.prompt, parent.prompt_token_ids, parent.outputs, True,
                                 parent.prompt_logprobs)
        if kind is RequestOutputKind.DELTA:
            return self._delta(parent_id, parent)
        return self._snapshot(parent_id, parent)

    @staticmethod
    def _delta(parent_id: str, parent: _ParentRequest) -> RequestOutput:
        """What is new since the last output, per completion that advanced: its cost is the new
        tokens, not the completion's length (a long stream stays linear)."""
        outs = []
        for o, sent in zip(parent.outputs, parent.sent):
            chars, tokens, done = sent
            if done or (len(o.token_ids) == tokens and len(o.text) == chars and not o.finished):
                continue
            outs.append(CompletionOutput(o.index, o.text[chars:], o.token_ids[tokens:], o.cumulative_logprob,
                                         o.logprobs[tokens:] if o.logprobs is not None else None,
                                         o.finish_reason, o.stop_reason))
            sent[:] = [len(o.text), len(o.token_ids), o.finished]
        return RequestOutput(parent_id, parent.prompt, parent.prompt_token_ids, outs, parent.finished,
                             parent.prompt_logprobs)

    @staticmethod
    def _snapshot(parent_id: str, parent: _ParentRequest) -> RequestOutput:
        outs = [
            CompletionOutput(o.index, o.text, list(o.token_ids), o.cumulative_logprob,
                             list(o.logprobs) if o.logprobs is not None else None,
                             o.finish_reason, o.stop_reason)
            for o in parent.outputs
        ]
        return RequestOutput(parent_id, parent.prompt, parent.prompt_token_ids, outs, parent.finished,
                             parent.prompt_logprobs)

    def stats(self) -> dict[str, int]:
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "preempted": self.scheduler.num_preemptions,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_blocks_used": self.runner.num_blocks - self.kv.num_free_blocks,
            "prefix_cache_hit_tokens": self.kv.prefix_hit_tokens,
            "prefix_cache_query_tokens": self.kv.prefix_query_tokens,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
        }
