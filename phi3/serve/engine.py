"""Continuous batching: one loop decodes every active sequence together, each in its own KV slot.

The pieces are the generator's (`phi3.generate`): `SamplingParams`, `sample_next`, and the
detokeniser with stop tokens and stop strings (`text_row`), so a request gives the same tokens
here as `generate_tokens` gives for it alone (greedy, or sampled with the same seed).

Slots. The KV cache holds `slots` rows of `slot_len` columns. Each row is one sequence, written
from column 0 with position == column; the row's own length is its write index. The active
sequences always occupy rows 0..A-1 (compact): a finished or cancelled sequence leaves at once,
and the last active row is moved into its place, so one decode step is one forward over the
contiguous rows [0, A) — views, no gathers. Columns past a row's length hold stale keys with
position -1, which the attention mask hides.

Prefix reuse. A sequence that leaves is kept in a free row (its tokens and their keys) while no
one needs that row: a request whose prompt begins with a kept sequence's tokens (a chat client
sending the whole conversation again, a shared system prompt) takes that row and prefills only
what follows; the reply is the same (the generator's `PromptCache` does the same for one caller).
A new request goes into the first free row; what that row keeps is moved into an empty row, or
over the sequence kept longest ago when that is older: the least recently kept goes first.

A step: drop cancelled requests; admit waiting requests into free rows (each prompt prefilled
alone into its row, its first token sampled at once); then one decode forward for all rows
(input [A, 1], each row writing at its own length); each row samples with its own parameters and
random generator, and a row that stops leaves before the next step.

LongRoPE, per row (the generator's rule for one sequence): a row whose prompt is longer than
`original_max_position_embeddings` (L0) is prefilled under the long factors; a row cached under
the short factors that reaches L0 + 1 tokens has its whole sequence recomputed into its row under
the long factors (once), and the rotary factors of a decode step are chosen per row.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generate import Delta, SamplingParams, reusable_prefix, sample_next, text_row
from ..models.phi3 import Cache


class QueueFull(Exception):
    """The waiting queue is at its bound; the server answers 429."""


@dataclass
class Request:
    """One generation request. `on_event` is called from the engine thread with each `Delta`
    (the last has a finish reason) or with an Exception if the engine failed."""
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Delta | Exception], None]
    continuation: bool = False
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)  # every sampled token, stop token included
    cached_tokens: int = 0  # prompt tokens found in a kept row, not prefilled again

    def cancel(self) -> None:
        """Free the request's slot before the next step (a client that went away)."""
        self.cancelled = True


@dataclass
class _Seq:
    """An admitted request: its tokens so far (the last one not yet in the cache) and its state."""
    req: Request
    ids: list[int]
    row: object  # generate._TextRow
    rng: torch.Generator
    seen: torch.Tensor | None  # [1, V] bool, only with a repetition penalty
    max_new: int
    generated: int = 0
    long: bool = False  # cached under LongRoPE's long factors
    done: bool = False
    last_token_time: float = 0.0


# ---- the KV slots ---------------------------------------------------------------------------------
class _RowsKV:
    """One layer's k, v restricted to rows [a, b); writes at a shared column (int) or per row (tensor)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, view: "_RowsView"):
        self.k, self.v, self.view = k, v, view  # [R, KV, S, d]

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start, int):  # prefill: T tokens at columns start..start+T
            end = start + k.shape[2]
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        else:  # decode: one token per row, at that row's own length (start [R])
            r, kv, s, d = self.k.shape
            index = self.view.flat_index  # [R * KV]: (row * KV + head) * S + start[row]
            self.k.view(r * kv * s, d).index_copy_(0, index, k.reshape(r * kv, d).to(self.k.dtype))
            self.v.view(r * kv * s, d).index_copy_(0, index, v.reshape(r * kv, d).to(self.v.dtype))
            end = self.view.end
        return self.k[:, :, :end], self.v[:, :, :end]


class _RowsView:
    """The `Cache` interface the model's forward uses, over rows [a, b) of a `SlotCache`.

    `length` is an int (all rows write at that column: a prefill) or a LongTensor [R] (each row
    writes one token at its own length: a decode step)."""

    def __init__(self, cache: Cache, rows: slice, length):
        self.length = length
        self.positions = cache.positions[rows]
        self.end = 0
        self.layers = [_RowsKV(kv.k[rows], kv.v[rows], self) for kv in cache.layers]

    def record_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [R, T] -> key positions [R, end] (end: past the longest row)."""
        if isinstance(self.length, int):
            self.end = self.length + positions.shape[1]
            self.positions[:, self.length:self.end] = positions
        else:
            r, s = self.positions.shape
            self.end = int(self.length.max()) + 1
            self.positions[torch.arange(r), self.length] = positions[:, 0]
            kv = self.layers[0].k.shape[1]  # (row, head, column) of a [R, KV, S, d] buffer as one index
            self.flat_index = torch.arange(r * kv) * s + self.length.repeat_interleave(kv)
        return self.positions[:, :self.end]


@dataclass
class _Kept:
    """What a free row still holds of a sequence that left: the tokens whose keys are in columns
    0 .. len - 1, under LongRoPE's long factors or not."""
    tokens: list[int]
    long: bool
    when: int  # the engine step it was kept at (the oldest is taken over first)


class SlotCache:
    """KV storage for `slots` sequences of up to `slot_len` tokens, each with its own length; a free
    row may keep a sequence that left (`kept`), for a later prompt that begins with it."""

    def __init__(self, model, slots: int, slot_len: int):
        self.store = Cache(model, slots, slot_len, device=model.device)
        self.lengths = torch.zeros(slots, dtype=torch.long)  # tokens held per row
        self.kept: list[_Kept | None] = [None] * slots

    def clear(self, row: int) -> None:
        self.store.positions[row].fill_(-1)
        self.lengths[row] = 0
        self.kept[row] = None

    def move(self, src: int, dst: int, n: int | None = None) -> None:
        """Move the first `n` (default: all) tokens of row `src` into row `dst` and clear `src`."""
        n = int(self.lengths[src]) if n is None else n
        for kv in self.store.layers:
            kv.k[dst, :, :n] = kv.k[src, :, :n]
            kv.v[dst, :, :n] = kv.v[src, :, :n]
        self.store.positions[dst, :n] = self.store.positions[src, :n]
        self.store.positions[dst, n:] = -1
        self.lengths[dst] = n
        self.kept[dst] = self.kept[src]
        self.clear(src)

    def prefill_view(self, row: int, start: int = 0) -> _RowsView:
        """Row `row` for a prompt whose first `start` tokens it already holds."""
        self.store.positions[row, start:] = -1
        self.lengths[row] = start
        self.kept[row] = None
        return _RowsView(self.store, slice(row, row + 1), start)

    def decode_view(self, active: int) -> _RowsView:
        return _RowsView(self.store, slice(0, active), self.lengths[:active].clone())


# ---- the engine -----------------------------------------------------------------------------------
class Engine:
    """Continuous batching over `slots` KV rows; a background thread runs `step()` while there is work."""

    def __init__(self, lm, slots: int = 8, slot_len: int = 2048, max_queue: int = 64, metrics=None):
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.slots, self.max_queue = slots, max_queue
        self.context = min(slot_len, self.model.config.max_position_embeddings)
        self.cache = SlotCache(self.model, slots, self.context)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.active: list[_Seq] = []  # active[i] lives in cache row i
        self.waiting: deque[Request] = deque()
        self.metrics = metrics
        self.steps = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- called from other threads ----------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request (its prompt must fit: see `check_fits`). Raises QueueFull at the bound."""
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting")
            self.waiting.append(req)
            self._cond.notify()

    def stats(self) -> dict:
        return {"active": len(self.active), "waiting": len(self.waiting), "slots": self.slots, "steps": self.steps}

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="phi3-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.active and not self.waiting:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or out of memory: fail the requests in flight, keep serving
                self._fail_all(e)

    # ---- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        self._retire()
        self._admit()
        self._retire()
        if self.active:
            self._decode()
            self._retire()
        self.steps += 1

    def _admit(self) -> None:
        while len(self.active) < self.slots:
            with self._cond:
                if not self.waiting:
                    return
                req = self.waiting.popleft()
            if req.cancelled:
                continue
            try:
                seq = self._new_seq(req)
            except Exception as e:  # this request's parameters: fail it alone
                req.on_event(e)
                continue
            row = len(self.active)
            req.cached_tokens = self._take_kept(row, seq.ids)
            self.active.append(seq)
            logits = self._prefill(row, seq.ids, req.cached_tokens)
            seq.long = self.model.rotary.uses_long_factors(len(seq.ids))
            self._sample([row], logits)

    def _take_kept(self, row: int, prompt: list[int]) -> int:
        """Bring into free row `row` the kept sequence sharing the longest prefix with `prompt` (the
        same LongRoPE factors as a fresh prefill would use; the prompt's last token is always run);
        return how many prompt tokens it holds."""
        long = self.model.rotary.uses_long_factors(len(prompt))
        best, best_n = None, 0
        for r in range(row, self.slots):
            kept = self.cache.kept[r]
            if kept is None or kept.long != long:
                continue
            n = reusable_prefix(kept.tokens, prompt)
            if n > best_n:
                best, best_n = r, n
        if best != row and self.cache.kept[row] is not None:  # what `row` keeps moves aside, unless oldest
            spare = [r for r in range(row + 1, self.slots) if r != best]
            if spare:
                target = min(spare, key=self._kept_at)
                if self._kept_at(target) < self._kept_at(row):
                    self.cache.move(row, target)
        if best is not None and best != row:
            self.cache.move(best, row, best_n)
        return best_n

    def _kept_at(self, row: int) -> int:
        """The step row `row`'s sequence was kept at; -1 for a row that keeps nothing."""
        kept = self.cache.kept[row]
        return -1 if kept is None else kept.when

    def _new_seq(self, req: Request) -> _Seq:
        p = req.params
        rng = torch.Generator(device=self.model.device)
        rng.manual_seed(p.seed) if p.seed is not None else rng.seed()  # rng.seed(): fresh, global RNG untouched
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool)
            seen[0, torch.tensor(req.prompt_ids)] = True
        max_new = min(p.max_new_tokens, self.context - len(req.prompt_ids))
        row = text_row(self.tokenizer, req.prompt_ids, p, req.continuation)
        return _Seq(req, list(req.prompt_ids), row, rng, seen, max_new)

    def _prefill(self, row: int, ids: list[int], start: int = 0) -> torch.Tensor:
        """Write the sequence `ids` into cache row `row`, which holds its first `start` tokens already;
        logits [1, V] of its last token."""
        n = len(ids)
        view = self.cache.prefill_view(row, start)
        tokens = torch.tensor([ids[start:]], dtype=torch.long, device=self.model.device)  # [1, n - start]
        positions = torch.arange(start, n, device=self.model.device)[None]  # [1, n - start]
        logits = self.model(tokens, positions, view, seq_len=n, last_only=True)[:, -1]
        self.cache.lengths[row] = n
        return logits

    def _decode(self) -> None:
        a = len(self.active)
        view = self.cache.decode_view(a)
        positions = self.cache.lengths[:a].clone()  # [A]: position == column == tokens held
        tokens = torch.tensor([[s.ids[-1]] for s in self.active], dtype=torch.long)  # [A, 1]
        seq_len = positions + 1  # [A] each row's length with this token, for LongRoPE
        logits = self.model(tokens, positions[:, None], view, seq_len=seq_len)[:, -1]  # [A, V]
        self.cache.lengths[:a] += 1
        for i, s in enumerate(self.active):
            if not s.long and self.model.rotary.uses_long_factors(len(s.ids)):
                # This row just passed L0: recompute its whole sequence under the long factors.
                logits[i] = self._prefill(i, s.ids)[0]
                s.long = True
        self._sample(range(a), logits)

    def _sample(self, rows, logits: torch.Tensor) -> None:
        """Sample each row's next token with its own parameters and generator; emit the text."""
        now = time.perf_counter()
        for j, i in enumerate(rows):
            s = self.active[i]
            if s.done:
                continue
            token = int(sample_next(logits[j:j + 1], s.seen, s.req.params, s.rng)[0])
            if s.seen is not None:
                s.seen[0, token] = True
            s.ids.append(token)
            s.req.output_ids.append(token)
            s.generated += 1
            if self.metrics is not None:
                self.metrics.observe_token(s, now)
            s.last_token_time = now
            delta = s.row.delta(token)
            if delta is not None:
                s.req.on_event(delta)
            if s.row.finish_reason:
                s.done = True
            elif s.generated >= s.max_new:
                s.req.on_event(s.row.final())
                s.done = True

    def _retire(self) -> None:
        """Finished and cancelled sequences leave now; the last active row fills each hole. What a
        leaving sequence holds is kept in a free row (see `_keep`)."""
        i = 0
        while i < len(self.active):
            s = self.active[i]
            if s.done or s.req.cancelled:
                if self.metrics is not None:
                    self.metrics.observe_finish(s)
                last = len(self.active) - 1
                self._keep(i, s, last)
                if i != last:
                    self.cache.move(last, i)
                    self.active[i] = self.active[last]
                self.active.pop()
            else:
                i += 1

    def _keep(self, row: int, s: _Seq, last: int) -> None:
        """Keep what row `row` holds of `s` (leaving; rows >= `last` are free once it has left) in a
        free row: its own when it is the last active row, else the free row kept longest ago (none
        free: not kept)."""
        n = int(self.cache.lengths[row])
        kept = _Kept(s.ids[:n], s.long, self.steps)
        if row == last:
            self.cache.kept[row] = kept
            return
        free = range(last + 1, self.slots)
        if not free:
            return
        target = min(free, key=self._kept_at)
        self.cache.move(row, target)
        self.cache.kept[target] = kept

    def _fail_all(self, error: Exception) -> None:
        for s in self.active:
            s.req.on_event(error)
        for row in range(len(self.active)):
            self.cache.clear(row)
        self.active.clear()
