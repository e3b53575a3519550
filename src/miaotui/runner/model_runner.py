"""SchedulerOutput -> flat tensors -> model forward -> sampled token ids.

Owns the paged KV cache ([num_blocks, block_size, kv_heads, head_dim] for K and V per layer)
and binds it to the model's attention layers once at start-up. The cache is left
uninitialised: attention reads only slots that this or an earlier step wrote.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from miaotui.config import CacheConfig, ModelConfig
from miaotui.step_plan import ScheduledSeq, SchedulerOutput
from miaotui.layers.attention import AttentionMetadata, build_decode_batch
from miaotui.layers.cross_attention import CrossAttentionBatch, query_layout, stack_encoder_kv
from miaotui.layers.quantized import has_low_bit_weights
from miaotui.runner.compiled_decode import CompiledDecode
from miaotui.runner.kv_layout import KVGroup, log_kv_layout, plan_kv_layout
from miaotui.sample.prompt_logprobs import PromptLogprob, score_tokens
from miaotui.sample.sampler import Sampler, SamplerOutput

logger = logging.getLogger(__name__)


def kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device, quantized: bool) -> torch.dtype:
    """The cache dtype of CacheConfig.kv_cache_dtype. "auto" is the model's dtype, except for an
    fp32 CPU model with low-bit weights: fp16 (llama.cpp's default too). Such a model already
    trades the reference's exact numbers for memory, and K/V rounded to 11 bits move its logits
    far less than its 4-bit weights do, while the cache (most of a busy server's memory) halves.
    A dtype other than the model's is for the CPU only (the GPU kernels read the model's dtype)."""
    if name == "auto":
        fp16 = quantized and device.type == "cpu" and model_dtype == torch.float32
        return torch.float16 if fp16 else model_dtype
    dtype = getattr(torch, name)
    if dtype != model_dtype and device.type != "cpu":
        raise ValueError(f"kv_cache_dtype {name}: a cache dtype other than the model's ({model_dtype}) "
                         f"is supported on the CPU only, not on {device.type}")
    return dtype


def default_kv_cache_gib(device: torch.device) -> float:
    """A share of free memory: 90% of free GPU memory after the weights, or on the CPU a quarter
    of available RAM, at most 4 GiB (enough for hundreds of thousands of small-model tokens)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.9 * free / 2**30
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * 2**30
    return max(min(available / 4 / 2**30, 4.0), 0.25)


@dataclass(slots=True)
class StepInputs:
    """One step as plain host data, the same for every tensor-parallel rank: the new tokens of
    each sequence in order (flat), where their K/V goes, each sequence's blocks and lengths, the
    rows to compute logits for (sampled rows, then rows scoring prompt tokens), fork copies
    (src, dst), and blocks used for the first time."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    query_start: list[int] = field(default_factory=lambda: [0])
    sample_rows: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    new_blocks: list[int] = field(default_factory=list)
    windows: list[WindowInputs] = field(default_factory=list)  # one per window KV group; [] for most models


@dataclass(slots=True)
class WindowInputs:
    """One sliding-window KV group's share of a step, in its own block ids: where the new
    tokens' K/V goes, each sequence's table (placeholders where blocks were released), blocks
    used for the first time, fork copies (src, dst)."""

    slots: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    new_blocks: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class StepResult:
    """What one step produced: sampled tokens, their logprobs, beams' log-distributions, and
    prompt logprobs: request id -> (first position scored, one entry per position)."""

    token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, tuple] = field(default_factory=dict)
    beam_logprobs: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[PromptLogprob]]] = field(default_factory=dict)


def prompt_logprob_positions(seq: ScheduledSeq) -> range:
    """Positions of a chunk whose logits score a prompt token (position p scores token p + 1),
    for a request still needing prompt logprobs; empty otherwise (no extra logits computed)."""
    req = seq.request
    if not req.needs_prompt_logprobs:
        return range(0)
    return range(seq.start, max(seq.start, min(seq.start + seq.num_new_tokens, req.num_prompt_tokens - 1)))


class ModelRunner:
    # Whether sliding-window layers get KV groups of their own (off: every layer keeps every
    # block in one group, as before groups existed; the reference the group tests compare with).
    supports_window_groups = True

    def __init__(self, model: nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 max_model_len: int, max_num_batched_tokens: int | None = None,
                 group_blocks: tuple[int, ...] | None = None, max_num_seqs: int | None = None) -> None:
        """`group_blocks` fixes each KV group's block count (primary first): a tensor-parallel
        worker takes the driver's, since block ids are global across ranks."""
        self.model = model
        self.device = torch.device(model_config.device)
        self.dtype = model_config.dtype
        self.kv_dtype = kv_cache_dtype(cache_config.kv_cache_dtype, self.dtype, self.device,
                                       has_low_bit_weights(model))
        self.block_size = cache_config.block_size
        budget = 0.0
        if cache_config.num_blocks is None:
            budget = (cache_config.kv_cache_memory_gib or default_kv_cache_gib(self.device)) * 2**30
        self.kv_layout = plan_kv_layout(model, self.block_size, self.kv_dtype, num_blocks=cache_config.num_blocks,
                                        budget_bytes=budget, max_model_len=max_model_len,
                                        max_chunk=max_num_batched_tokens or max_model_len,
                                        with_windows=self.supports_window_groups, group_blocks=group_blocks,
                                        max_seqs=max_num_seqs)
        log_kv_layout(self.kv_layout, self.block_size, max_model_len, self.kv_dtype)
        self.num_blocks = self.kv_layout.primary.num_blocks
        # (window, num_blocks) of each sliding-window group: the KV manager's `windows`.
        self.kv_windows = tuple((g.window, g.num_blocks) for g in self.kv_layout.windows)
        for group in self.kv_layout.groups:
            for attn in group.layers:
                shape = (group.num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
                attn.k_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
                attn.v_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        # Invariant: every block a step reads holds finite numbers. Batched decode attention
        # reads whole blocks (and block 0 as padding; window groups read block 0 for released
        # blocks too) and masks the unwritten slots, but a masked NaN from uninitialised memory
        # would still poison the softmax-weighted sum (0 * NaN). Zeroing the whole cache up front
        # would commit all its pages at once, so each block is zeroed the first time a step uses
        # it; reused blocks keep finite old values. One flag array per group (ids are per group).
        self._zeroed = bytearray(self.num_blocks)
        self._window_zeroed = [bytearray(g.num_blocks) for g in self.kv_layout.windows]
        for g, zeroed in zip(self.kv_layout.windows, self._window_zeroed):
            zeroed[0] = 1
            self._zero_group_blocks(g, [0])
        self._zero_new_blocks([0])
        self.sampler = Sampler(model_config.seed, self.device)
        self.compiled_decode = CompiledDecode(model) if model_config.compile_decode else None
        self.is_encoder_decoder = getattr(model, "is_encoder_decoder", False)
        self.encoder_tokens_total = 0
        # The last step's stacked encoder K/V and the EncoderStates it was built from (holding
        # them keeps identity checks sound); reused while the batch's sequences are the same.
        self._cross_stack: tuple[list, tuple] | None = None

    def step_inputs(self, sched: SchedulerOutput) -> StepInputs:
        """The step as plain host data; marks the blocks it uses for the first time as zeroed."""
        bs = self.block_size
        inputs = StepInputs(block_copies=list(sched.block_copies))
        used = [b for pair in sched.block_copies for b in pair]
        used += [b for s in sched.seqs for b in s.request.block_ids]
        inputs.new_blocks = list(dict.fromkeys(b for b in used if not self._zeroed[b]))
        for b in inputs.new_blocks:
            self._zeroed[b] = 1
        for seq in sched.seqs:
            req = seq.request
            end = seq.start + seq.num_new_tokens
            inputs.input_ids.extend(req.token_ids[seq.start:end])
            pos = range(seq.start, end)
            inputs.positions.extend(pos)
            blocks = req.block_ids
            inputs.slots.extend(blocks[p // bs] * bs + p % bs for p in pos)
            inputs.block_tables.append(list(blocks))
            inputs.seq_lens.append(end)
            inputs.query_start.append(inputs.query_start[-1] + seq.num_new_tokens)
            if seq.samples:
                inputs.sample_rows.append(inputs.query_start[-1] - 1)
            scored = len(prompt_logprob_positions(seq))
            if scored:
                first = inputs.query_start[-2]  # the row of position seq.start
                inputs.prompt_rows.extend(range(first, first + scored))
        if self._window_zeroed:
            inputs.windows = self._window_inputs(sched)
        return inputs

    def _window_inputs(self, sched: SchedulerOutput) -> list[WindowInputs]:
        """step_inputs' slots, tables and fresh blocks again in each window group's block ids."""
        bs = self.block_size
        groups = []
        for g, zeroed in enumerate(self._window_zeroed):
            copies = list(sched.window_block_copies[g]) if sched.window_block_copies else []
            win = WindowInputs(block_copies=copies)
            used = [b for pair in copies for b in pair]
            for seq in sched.seqs:
                tables = seq.request.window_block_ids
                if len(tables) != len(self._window_zeroed):
                    raise RuntimeError(
                        f"request {seq.request.request_id} has {len(tables)} window block tables but the model has "
                        f"{len(self._window_zeroed)} sliding-window KV groups: give the KV manager the runner's kv_windows")
                blocks = tables[g]
                used += blocks
                win.slots.extend(blocks[p // bs] * bs + p % bs for p in range(seq.start, seq.start + seq.num_new_tokens))
                win.block_tables.append(list(blocks))
            win.new_blocks = list(dict.fromkeys(b for b in used if not zeroed[b]))
            for b in win.new_blocks:
                zeroed[b] = 1
            groups.append(win)
        return groups

    def _tensors(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        tables = torch.zeros(len(inputs.block_tables), max(map(len, inputs.block_tables)), dtype=torch.int64)
        for i, blocks in enumerate(inputs.block_tables):
            tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(inputs.slots, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            seq_lens=torch.tensor(inputs.seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(inputs.query_start, dtype=torch.int32, device=dev),
            seq_lens_list=inputs.seq_lens,
            query_start_loc_list=inputs.query_start,
        )
        meta.decode = build_decode_batch(meta, self.block_size, self.num_blocks)
        if inputs.windows:
            meta.windows = {g.window: self._window_meta(meta, win, g.num_blocks)
                            for g, win in zip(self.kv_layout.windows, inputs.windows)}
        ids = torch.tensor(inputs.input_ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(inputs.positions, dtype=torch.int64, device=dev)
        return ids, positions, meta

    def _window_meta(self, meta: AttentionMetadata, win: WindowInputs, num_blocks: int) -> AttentionMetadata:
        """A window group's metadata: its own slots and tables, the step's lengths and offsets."""
        tables = torch.zeros(len(win.block_tables), max(map(len, win.block_tables)), dtype=torch.int64)
        for i, blocks in enumerate(win.block_tables):
            tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        sub = AttentionMetadata(
            slot_mapping=torch.tensor(win.slots, dtype=torch.int64, device=self.device),
            block_tables=tables.to(self.device), seq_lens=meta.seq_lens, query_start_loc=meta.query_start_loc,
            seq_lens_list=meta.seq_lens_list, query_start_loc_list=meta.query_start_loc_list)
        sub.decode = build_decode_batch(sub, self.block_size, num_blocks)
        return sub

    def _zero_blocks(self, blocks: list[int]) -> None:
        self._zero_group_blocks(self.kv_layout.primary, blocks)

    def _zero_group_blocks(self, group: KVGroup, blocks: list[int]) -> None:
        if not blocks:
            return
        index = torch.tensor(blocks, dtype=torch.int64, device=self.device)
        for attn in group.layers:
            attn.k_cache.index_fill_(0, index, 0.0)
            attn.v_cache.index_fill_(0, index, 0.0)

    def _zero_new_blocks(self, blocks) -> None:
        fresh = [b for b in blocks if not self._zeroed[b]]
        for b in fresh:
            self._zeroed[b] = 1
        self._zero_blocks(fresh)

    def _cross_batch(self, sched: SchedulerOutput) -> CrossAttentionBatch:
        """Encode the step's requests whose encoder has not run yet (once per user request, in
        one padded batch), then lay out every sequence's encoder K/V for cross-attention."""
        states = [s.request.encoder for s in sched.seqs]
        fresh = list({id(st): st for st in states if st.cross_kv is None}.values())
        if fresh:
            self.encoder_tokens_total += self.model.encode(fresh)
        cached = self._cross_stack
        if cached is None or len(cached[0]) != len(states) or any(a is not b for a, b in zip(cached[0], states)):
            cached = (states, stack_encoder_kv(states, self.device))
            self._cross_stack = cached
        keys, values, mask = cached[1]
        pad_index, q_max = query_layout([s.num_new_tokens for s in sched.seqs], self.device)
        return CrossAttentionBatch(keys, values, mask, pad_index, q_max)

    @torch.inference_mode()
    def forward_inputs(self, inputs: StepInputs, sched: SchedulerOutput | None = None) -> torch.Tensor | None:
        """Zero fresh blocks, make the fork copies, run the forward pass; logits [rows, vocab] fp32
        of the sampled rows, then of the prompt-scoring rows, or None for a step with no tokens. Every tensor-parallel rank
        runs this on the same inputs. `sched` is needed by encoder-decoder models only."""
        # Before the copies: a fork's destination block is zeroed now, then overwritten, and
        # never zeroed again (a later step would otherwise wipe the copied K/V).
        self._zero_blocks(inputs.new_blocks)
        self.copy_blocks(inputs.block_copies)
        for group, win in zip(self.kv_layout.windows, inputs.windows):
            self._zero_group_blocks(group, win.new_blocks)
            self._copy_group_blocks(group, win.block_copies)
        if not inputs.input_ids:
            self._cross_stack = None  # nothing runs: let finished requests' encoder K/V go
            return None
        ids, positions, meta = self._tensors(inputs)
        if self.is_encoder_decoder:
            meta.cross = self._cross_batch(sched)
        hidden = self.model(ids, positions, meta)  # decode steps through CompiledDecode's graph when on
        rows = inputs.sample_rows + inputs.prompt_rows if inputs.prompt_rows else inputs.sample_rows
        return self.model.compute_logits(hidden[rows])

    def forward_logits(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """Run one step's forward pass; logits [sampled + prompt-scoring rows, vocab] in fp32."""
        return self.forward_inputs(self.step_inputs(sched), sched)

    def release_step_cache(self) -> None:
        """Drop what is kept from one step to the next (the stacked encoder K/V of T5 batches)."""
        self._cross_stack = None

    def shutdown(self) -> None:
        """Nothing to release in one process (the tensor-parallel runner stops its workers)."""

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks src -> dst in every layer of the primary group (forks:
        copy-on-write of a partial block)."""
        self._copy_group_blocks(self.kv_layout.primary, copies)

    def _copy_group_blocks(self, group: KVGroup, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for attn in group.layers:
            attn.k_cache.index_copy_(0, dst, attn.k_cache.index_select(0, src))
            attn.v_cache.index_copy_(0, dst, attn.v_cache.index_select(0, src))

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Copy forked blocks, then forward + sample the sequences that reach their last token."""
        result = StepResult()
        logits = self.forward_logits(sched)
        if logits is None:
            return result
        requests = [s.request for s in sched.seqs if s.samples]
        if logits.shape[0] > len(requests):
            result.prompt_logprobs = self._score_prompts(sched, logits[len(requests):])
            logits = logits[:len(requests)]
        rows = [i for i, r in enumerate(requests) if not r.is_beam]
        for i, r in enumerate(requests):
            if r.is_beam:
                result.beam_logprobs[r.request_id] = torch.log_softmax(logits[i], dim=-1)
        if rows:
            sampling = [requests[i] for i in rows]
            out: SamplerOutput = self.sampler(logits[rows] if len(rows) < len(requests) else logits, sampling)
            result.token_ids = {r.request_id: t for r, t in zip(sampling, out.token_ids)}
            result.logprobs = {r.request_id: lp for r, lp in zip(sampling, out.logprobs) if lp is not None}
        return result

    @staticmethod
    def _score_prompts(sched: SchedulerOutput, logits: torch.Tensor) -> dict[str, tuple[int, list[PromptLogprob]]]:
        """Split the prompt-scoring rows (laid out by step_inputs, in step order) per request."""
        scored = {}
        row = 0
        for seq in sched.seqs:
            positions = prompt_logprob_positions(seq)
            if not positions:
                continue
            req = seq.request
            targets = req.token_ids[positions.start + 1:positions.stop + 1]
            scored[req.request_id] = (positions.start, score_tokens(
                logits[row:row + len(positions)], targets, req.sampling_params.prompt_logprobs))
            row += len(positions)
        return scored
