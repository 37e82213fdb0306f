"""Phi-3-small's block-sparse attention (spec §2.4), computed block by block so masked blocks cost nothing.

Pattern (B = block size, NL = local blocks, V = vertical stride, query head h, qb = t // B, kb = s // B):

    allowed(h, t, s) = s <= t  AND  ( qb - kb < NL  OR  (kb + h * step + 1) % V == 0 )

with step = 0 for a homogeneous pattern, else max(1, V // n_heads). So each query sees a local band of
its own block and the NL - 1 before it, plus every V-th older block ("vertical" blocks, phase set by head).

Kernels, all exact:
- `blocksparse_prefill`: a whole sequence from position 0, one query block at a time; a block touches
  only its band (one contiguous key slice, shared by a KV head's query heads) and, per head, that
  head's vertical blocks before the band.
- `SparseKVCache`: a cache that keeps only what can still be attended: a ring of the last NL·B
  positions, plus the vertical blocks of the heads that read each KV head (with GQA the KV heads are
  shared, so a KV head keeps the union of its query heads' phases). `prefill_chunk` runs a prompt
  chunk that continues it through the same fused kernel as `blocksparse_prefill`; `attend` takes
  anything else (decode, padded rows), each query head reading only its own phase's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import FLASH_WITH_LSE, fused_kernel_runs


@dataclass(frozen=True)
class SparsePattern:
    block: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    n_heads: int = 32  # query heads (global count: the phase depends on the head index)
    homo_head: bool = False

    @property
    def step(self) -> int:
        return 0 if self.homo_head else max(1, int(self.vert_stride / self.n_heads))

    def phase(self, h: int) -> int:
        """Head h's vertical blocks are kb ≡ phase (mod V)."""
        return (-(h * self.step) - 1) % self.vert_stride

    def phases(self) -> torch.Tensor:
        return torch.tensor([self.phase(h) for h in range(self.n_heads)])

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos [..., Tq], k_pos [..., S] (absolute) -> bool [..., H, Tq, S]; negative positions see nothing."""
        qb, kb = (q_pos // self.block)[..., None, :, None], (k_pos // self.block)[..., None, None, :]
        phase = self.phases().to(q_pos.device)[:, None, None]  # [H, 1, 1]
        band = qb - kb < self.local_blocks
        vertical = kb % self.vert_stride == phase
        causal = (k_pos[..., None, None, :] <= q_pos[..., None, :, None]) & (k_pos >= 0)[..., None, None, :]
        return causal & (band | vertical) & (q_pos >= 0)[..., None, :, None]


def _vertical_positions(pattern: SparsePattern, before_block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the key positions of its vertical blocks kb < before_block, padded to the longest head.
    -> index [H, n] (padding: 0) and valid [H, n]."""
    B, V = pattern.block, pattern.vert_stride
    phase = pattern.phases().to(device)  # [H]
    n_blocks = max(0, (before_block + V - 1) // V)  # the most vertical blocks any head has
    blocks = phase[:, None] + V * torch.arange(n_blocks, device=device)  # [H, nv]
    valid_blocks = blocks < before_block
    pos = (blocks[..., None] * B + torch.arange(B, device=device)).flatten(1)  # [H, nv*B]
    valid = valid_blocks[..., None].expand(-1, -1, B).flatten(1)
    return torch.where(valid, pos, 0), valid


def blocksparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                        scale: float, chunk_blocks: int | None = None, band_blocks: int | None = None) -> torch.Tensor:
    """Block-sparse causal attention for a sequence at positions 0..T-1.

    q [b, H, T, d], k/v [b, KV, T, d] -> [b, H, T, d]. On CPU, queries go `chunk_blocks` blocks at a time
    (default: the vertical stride) through PyTorch's fused flash-attention kernel, which returns each
    row's log-sum-exp, so a chunk's attention is computed in up to three parts and merged exactly (the
    kernel skips no masked tile, so its time is proportional to the score entries it is given):

    - A, the vertical cycles wholly before the chunk's first band: every head has exactly one block per
      cycle there, all visible to every row of the chunk, so no mask (each head's own keys, gathered once);
    - A2, the few vertical blocks after A that fall out of the band for some rows of the chunk (per-head
      keys, a small mask: block before the row's band);
    - B, the band, `band_blocks` query blocks at a time (default 1): the span of NL blocks ending at
      the query block (contiguous keys shared by a KV head's G query heads, whose queries are stacked
      into one call), masked by "causal and within NL blocks", the same for every head. One block at a
      time reads NL blocks per query block; a whole 8-block chunk would read the 8 + NL − 1 blocks of
      its span for every row (1.4× the entries; measured 12 % slower at 32K, 25 % at 4K).

    Merging: out = Σ_i o_i · exp(lse_i − L), L = log Σ_i exp(lse_i) (in fp32). Elsewhere (other devices,
    or a PyTorch without the kernel) the block-by-block path runs.
    """
    if not fused_kernel_runs(q):
        return _prefill_by_block(q, k, v, pattern, scale)
    H, T = q.shape[1], q.shape[2]
    G = H // k.shape[1]
    n_blocks = (T + pattern.block - 1) // pattern.block
    # each head's vertical keys by cycle: cycle j holds block phase(h) + V*j  ->  [b, H, cycles*B, d]
    index, _ = _vertical_positions(pattern, n_blocks, q.device)
    index = index.clamp(max=T - 1)  # blocks past the end are never read (masked or beyond every A/A2 range)
    head_kv = torch.arange(H, device=q.device) // G
    k_vert, v_vert = k[:, head_kv[:, None], index], v[:, head_kv[:, None], index]
    return _fused_attention(q, 0, k, v, k_vert, v_vert, pattern, scale, chunk_blocks, band_blocks)


def _fused_attention(q: torch.Tensor, q_block: int, k: torch.Tensor, v: torch.Tensor, k_vert: torch.Tensor,
                     v_vert: torch.Tensor, pattern: SparsePattern, scale: float, chunk_blocks: int | None,
                     band_blocks: int | None) -> torch.Tensor:
    """`blocksparse_prefill`'s fused path for queries q [b, H, Tq, d] at positions q_block·B + (0 .. Tq-1),
    the sequence before them being in the keys given:
    - k, v [b, KV, L, d]: every position from the first block of the first query's band, max(0,
      q_block - NL + 1)·B, to the last query (L = Tq for a sequence from 0);
    - k_vert, v_vert [b, H, n, d]: each head's vertical keys by cycle from cycle 0 (cycle j: block
      phase(h) + V·j), covering every vertical block before the last query's band.
    -> [b, H, Tq, d]."""
    b, H, Tq, d = q.shape
    KV, B, NL, V = k.shape[1], pattern.block, pattern.local_blocks, pattern.vert_stride
    G = H // KV
    C = chunk_blocks or V
    Cb = band_blocks or 1
    T = q_block * B + Tq  # absolute end
    end_block = (T + B - 1) // B
    k_lo = max(0, q_block - NL + 1) * B  # absolute position of k[:, :, 0]
    phase = pattern.phases().to(q.device)  # [H]
    masks: dict = {}
    neg = float("-inf")

    def band_mask(first, n_rows, n_cols):
        """B: rows = G stacked copies of the chunk's queries, keys from the band's first block."""
        key = ("B", first, n_rows, n_cols)
        if key not in masks:
            t = first * B + torch.arange(n_rows, device=q.device)  # relative to the span start
            s = torch.arange(n_cols, device=q.device)
            ok = (s[None, :] <= t[:, None]) & (t[:, None] // B - s[None, :] // B < NL)
            m = torch.zeros(n_rows, n_cols, dtype=q.dtype, device=q.device).masked_fill_(~ok, neg)
            masks[key] = m.repeat(G, 1)  # [G*n, S]
        return masks[key]

    def tail_mask(qb0, cyc0, n_cyc, n_rows):
        """A2: vertical block phase(h) + V*(cyc0 + c) is read by a row of block qb iff it is before qb's band."""
        key = ("A2", qb0 - cyc0 * V, n_cyc, n_rows)
        if key not in masks:
            qb = (qb0 - cyc0 * V) + torch.arange(n_rows, device=q.device) // B  # shifted by a multiple of V
            kb = phase[:, None] + V * (torch.arange(n_cyc * B, device=q.device) // B)[None, :]  # [H, n]
            ok = kb[:, None, :] < (qb - NL + 1)[None, :, None]  # [H, rows, n]
            m = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, neg)
            masks[key] = (m, ok.any(-1))  # rows with no key here get lse = -inf
        return masks[key]

    def band(qb0, qb1, lo, hi):
        """B for query blocks qb0..qb1-1, `band_blocks` at a time: each step reads its own band span
        (contiguous keys shared by a KV head's G query heads, whose queries are stacked into one call).
        -> o [b, H, hi-lo, d], lse [b, H, hi-lo]."""
        o_all = torch.empty(b, H, hi - lo, d, dtype=q.dtype, device=q.device)
        lse_all = torch.empty(b, H, hi - lo, dtype=torch.float32, device=q.device)
        for s0 in range(qb0, qb1, Cb):
            slo, shi = s0 * B, min(T, min(s0 + Cb, qb1) * B)
            n, first = shi - slo, max(0, s0 - NL + 1)
            m = band_mask(s0 - first, n, shi - first * B).expand(b, KV, G * n, shi - first * B)
            q_rows = q[:, :, slo - q_block * B:shi - q_block * B].reshape(b, KV, G * n, d)
            o, lse = FLASH_WITH_LSE(q_rows, k[:, :, first * B - k_lo:shi - k_lo], v[:, :, first * B - k_lo:shi - k_lo],
                            attn_mask=m, scale=scale)  # [b, KV, G*n, d], [b, KV, G*n]
            o_all[:, :, slo - lo:shi - lo] = o.reshape(b, H, n, d)
            lse_all[:, :, slo - lo:shi - lo] = lse.reshape(b, H, n)
        return o_all, lse_all

    q = q.contiguous()
    out = torch.empty_like(q)
    # chunks aligned so that each one's first band starts a vertical cycle (A whole cycles, A2 small)
    grid = range((NL - 1) % V or V, end_block, V) if C == V else range(q_block, end_block, C)
    starts = sorted({q_block} | {s for s in grid if s > q_block})
    for i, qb0 in enumerate(starts):
        qb1 = starts[i + 1] if i + 1 < len(starts) else end_block
        lo, hi = qb0 * B, min(T, qb1 * B)
        n = hi - lo
        q_blk = q[:, :, lo - q_block * B:hi - q_block * B]  # [b, H, n, d]
        parts = [band(qb0, qb1, lo, hi)]
        first = max(0, qb0 - NL + 1)
        # A: whole vertical cycles before the first band of the chunk
        cyc_a = first // V
        if cyc_a:
            o, lse = FLASH_WITH_LSE(q_blk, k_vert[:, :, :cyc_a * B], v_vert[:, :, :cyc_a * B], scale=scale)
            parts.append((o, lse))
        # A2: vertical blocks from cycle cyc_a on that leave the band of some row of the chunk
        last_band = qb1 - NL + 1  # band start of the chunk's last block row
        n_cyc = max(0, -(-(last_band - cyc_a * V) // V)) if last_band > cyc_a * V else 0
        if n_cyc:
            m, has = tail_mask(qb0, cyc_a, n_cyc, n)
            if bool(has.any()):
                sl = slice(cyc_a * B, (cyc_a + n_cyc) * B)
                o, lse = FLASH_WITH_LSE(q_blk, k_vert[:, :, sl], v_vert[:, :, sl], attn_mask=m.expand(b, -1, -1, -1),
                                scale=scale)
                parts.append((o, lse.masked_fill(~has, neg)))
        rows = slice(lo - q_block * B, hi - q_block * B)
        if len(parts) == 1:
            out[:, :, rows] = parts[0][0]
            continue
        lses = torch.stack([p[1] for p in parts])  # [P, b, H, n]
        w = (lses - lses.logsumexp(0)).exp_().unsqueeze(-1)  # [P, b, H, n, 1]
        acc = parts[0][0].float() * w[0]
        for j in range(1, len(parts)):
            acc += parts[j][0].float() * w[j]
        out[:, :, rows] = acc
    return out


def _prefill_by_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                        scale: float) -> torch.Tensor:
    """`blocksparse_prefill` for devices without the fused CPU kernel: one query block at a time.

    q [b, H, T, d], k/v [b, KV, T, d] -> [b, H, T, d]. Query block qb reads only
    - its band: key blocks qb-NL+1 .. qb, shared by the G query heads of a KV head (one matmul per KV
      head, queries of the G heads stacked), causal inside the diagonal block;
    - its heads' vertical blocks before the band: a prefix of each head's vertical keys, gathered once.
    One softmax (in fp32) runs over the scores of both parts, without concatenating them.
    """
    b, H, T, d = q.shape
    KV, B, NL, V = k.shape[1], pattern.block, pattern.local_blocks, pattern.vert_stride
    G = H // KV
    n_blocks = (T + B - 1) // B
    head_kv = torch.arange(H, device=q.device) // G
    phase = pattern.phases().to(q.device)  # [H]
    index, _ = _vertical_positions(pattern, n_blocks, q.device)  # [H, n]: each head's vertical keys, by block
    index = index.clamp(max=T - 1)  # the tail of a partial last block is never read (it is never "before a band")
    k_vert, v_vert = k[:, head_kv[:, None], index], v[:, head_kv[:, None], index]  # [b, H, n, d]
    causal = torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
    q = q * scale  # scaling the queries once instead of every score
    out = torch.empty_like(q)
    for qb in range(n_blocks):
        lo, hi = qb * B, min(T, (qb + 1) * B)
        n = hi - lo
        band_lo = max(0, qb - NL + 1) * B
        q_blk = q[:, :, lo:hi]  # [b, H, n, d]
        s_band = torch.matmul(q_blk.reshape(b, KV, G * n, d), k[:, :, band_lo:hi].transpose(-1, -2))
        s_band = s_band.view(b, H, n, hi - band_lo).float()  # [b, H, n, S_band]
        s_band[..., -n:].masked_fill_(~causal[:n, :n], float("-inf"))
        first_band_block = max(0, qb - NL + 1)
        count = ((first_band_block - phase + V - 1) // V).clamp(min=0)  # [H] vertical blocks before the band
        n_vert = int(count.max()) * B
        top = s_band.amax(-1, keepdim=True)  # [b, H, n, 1]; finite: the diagonal key is always visible
        if n_vert:
            s_vert = torch.matmul(q_blk, k_vert[:, :, :n_vert].transpose(-1, -2)).float()  # [b, H, n, n_vert]
            seen = torch.arange(n_vert, device=q.device) < (count * B)[:, None]  # [H, n_vert]
            s_vert.masked_fill_(~seen[:, None, :], float("-inf"))
            top = torch.maximum(top, s_vert.amax(-1, keepdim=True))
        # softmax over both parts without concatenating them: exp(s - top) / Σ exp(s - top)
        p_band = s_band.sub_(top).exp_()
        total = p_band.sum(-1, keepdim=True)
        o_band = torch.matmul(p_band.to(q.dtype).view(b, KV, G * n, -1), v[:, :, band_lo:hi]).view(b, H, n, d)
        if n_vert:
            p_vert = s_vert.sub_(top).exp_()
            total = total + p_vert.sum(-1, keepdim=True)
            o_band = o_band + torch.matmul(p_vert.to(q.dtype), v_vert[:, :, :n_vert])
        out[:, :, lo:hi] = o_band / total.to(q.dtype)
    return out


class SparseKVCache(nn.Module):
    """The KV cache of one block-sparse layer, holding only keys that can still be attended.

    - ring: the last R = NL·B positions of each row (slot = position mod R): every band a future query
      can need. [b, KV, R, d], with the position held in each slot (-1 = empty).
    - vertical store: block kb of KV head g is kept iff kb mod V is the phase of one of g's query heads.
      [b, KV, P, cycles, B, d]: P = slots for the group's phases, cycle = kb // V; each slot's blocks
      are contiguous, so a query head reads its own vertical keys as one [cycles·B, d] view.
    Memory: R + T·P/V positions per KV head instead of T.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, pattern: SparsePattern,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.pattern = pattern
        B, V, H = pattern.block, pattern.vert_stride, pattern.n_heads
        group = H // kv_heads
        phases = pattern.phases().view(kv_heads, group)  # [KV, G]
        kept = [sorted(set(row.tolist())) for row in phases]
        P = max(len(p) for p in kept)
        slot_of_phase = torch.full((kv_heads, V), -1, dtype=torch.long)
        phase_of_slot = torch.full((kv_heads, P), -1, dtype=torch.long)
        for g, ps in enumerate(kept):
            for i, ph in enumerate(ps):
                slot_of_phase[g, ph], phase_of_slot[g, i] = i, ph
        # the query heads reading each slot, as rows of a [KV, P, M] table (M = most heads on one slot;
        # -1 = none): a slot's queries are stacked into one matmul against its keys; query head j of
        # KV head g is row head_row[g, j] of slot head_slot[g, j]
        head_slot = slot_of_phase.gather(1, phases)  # [KV, G]
        M = max(int((head_slot[g] == i).sum()) for g in range(kv_heads) for i in range(P))
        slot_heads = torch.full((kv_heads, P, M), -1, dtype=torch.long)
        head_row = torch.zeros(kv_heads, group, dtype=torch.long)
        for g in range(kv_heads):
            for i in range(P):
                heads = torch.nonzero(head_slot[g] == i).flatten()
                slot_heads[g, i, :heads.numel()] = heads
                head_row[g, heads] = torch.arange(heads.numel())
        self.R = min(pattern.local_blocks * B, max_len)
        self.cycles = max(1, math.ceil(max_len / (V * B)))
        kw = dict(dtype=dtype, device=device)
        self.register_buffer("ring_k", torch.zeros(batch, kv_heads, self.R, head_dim, **kw), persistent=False)
        self.register_buffer("ring_v", torch.zeros(batch, kv_heads, self.R, head_dim, **kw), persistent=False)
        self.register_buffer("ring_pos", torch.full((batch, self.R), -1, dtype=torch.long, device=device), persistent=False)
        shape = (batch, kv_heads, P, self.cycles, B, head_dim)
        self.register_buffer("vert_k", torch.zeros(shape, **kw), persistent=False)
        self.register_buffer("vert_v", torch.zeros(shape, **kw), persistent=False)
        self.register_buffer("slot_of_phase", slot_of_phase.to(device), persistent=False)
        self.register_buffer("head_slot", head_slot.to(device), persistent=False)  # [KV, G]
        self.register_buffer("slot_heads", slot_heads.to(device), persistent=False)  # [KV, P, M]
        self.register_buffer("head_row", head_row.to(device), persistent=False)  # [KV, G]
        self.register_buffer("lengths", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        # position held by each vertical-store entry, like the store: [KV, P, cycles·B] (-1: unused slot)
        block = phase_of_slot[:, :, None] + V * torch.arange(self.cycles)  # [KV, P, cycles]
        vert_pos = torch.where(phase_of_slot[:, :, None, None] >= 0, block[..., None] * B + torch.arange(B), -1)
        self.register_buffer("vert_pos", vert_pos.flatten(2).to(device), persistent=False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ring_k, self.ring_v, self.vert_k, self.vert_v))

    def reset(self) -> None:
        self.ring_pos.fill_(-1)
        self.lengths.zero_()

    # ---- writing ------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """k, v [b, KV, T, d] at absolute positions pos [b, T] (-1 = padding, not stored)."""
        B, V = self.pattern.block, self.pattern.vert_stride
        for r in range(k.shape[0]):
            keep = pos[r] >= 0
            p, kr, vr = pos[r][keep], k[r][:, keep], v[r][:, keep]  # [n], [KV, n, d]
            if p.numel() == 0:
                continue
            recent = p > p.max() - self.R  # only the last R positions survive in the ring
            slots = p[recent] % self.R
            self.ring_k[r][:, slots], self.ring_v[r][:, slots] = kr[:, recent], vr[:, recent]
            self.ring_pos[r, slots] = p[recent]
            block = p // B
            vslot = self.slot_of_phase[:, block % V]  # [KV, n]: -1 when no query head of g needs it
            g, i = torch.nonzero(vslot >= 0, as_tuple=True)
            if g.numel():
                where = (g, vslot[g, i], (block // V)[i], (p % B)[i])
                self.vert_k[r].index_put_(where, kr[g, i])
                self.vert_v[r].index_put_(where, vr[g, i])
            self.lengths[r] = torch.maximum(self.lengths[r], p.max() + 1)

    # ---- reading ------------------------------------------------------------------------------
    def _vertical_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The written cycles of the vertical store: k, v [b, KV, P, n, d] (views) and positions [KV, P, n]."""
        B, V = self.pattern.block, self.pattern.vert_stride
        cycles = min(self.cycles, max(1, math.ceil(int(self.lengths.max()) / (V * B))))
        b, KV, P, _, _, d = self.vert_k.shape
        n = cycles * B
        k = self.vert_k[:, :, :, :cycles].reshape(b, KV, P, n, d)
        v = self.vert_v[:, :, :, :cycles].reshape(b, KV, P, n, d)
        return k, v, self.vert_pos[:, :, :n]

    def can_prefill_chunk(self, q: torch.Tensor, q_pos: torch.Tensor) -> bool:
        """Whether `prefill_chunk` takes this chunk: every row continues its cached sequence at the same
        block-aligned position, without padding, on the fused CPU kernel."""
        start = int(q_pos[0, 0])
        if not (q.shape[2] > 1 and fused_kernel_runs(q) and start > 0 and start % self.pattern.block == 0
                and bool((self.lengths == start).all())
                and torch.equal(q_pos, torch.arange(start, start + q.shape[2], device=q_pos.device).expand_as(q_pos))):
            return False
        band = self._band_before(start)  # and the ring holds the band before the chunk, in every row
        return torch.equal(self.ring_pos[:, band % self.R], band.expand(self.ring_pos.shape[0], -1))

    def _band_before(self, start: int) -> torch.Tensor:
        """Positions of the band blocks before position `start` (a block boundary) that its block reads."""
        B, NL = self.pattern.block, self.pattern.local_blocks
        return torch.arange(max(0, start // B - NL + 1) * B, start, device=self.ring_pos.device)

    def prefill_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
                      chunk_blocks: int | None = None, band_blocks: int | None = None) -> torch.Tensor:
        """A prompt chunk that continues the cached sequence (`can_prefill_chunk`) through the fused
        kernel of `blocksparse_prefill`, as fast per token as one call over the whole prompt: its band
        keys are the ring's last positions before the chunk plus the chunk's own, its vertical keys
        each head's slot of the store. q [b, H, Tq, d], k, v [b, KV, Tq, d] -> [b, H, Tq, d]; the chunk
        is written to the cache."""
        B = self.pattern.block
        start = int(q_pos[0, 0])
        slots = self._band_before(start) % self.R  # the ring holds the last R >= NL*B positions
        k_band = torch.cat([self.ring_k[:, :, slots], k], 2)  # [b, KV, NL*B - B + Tq at most, d]
        v_band = torch.cat([self.ring_v[:, :, slots], v], 2)
        self.write(k, v, q_pos)
        vk, vv, _ = self._vertical_view()  # [b, KV, P, n, d]
        KV, G = self.head_slot.shape
        kv_of_head = torch.arange(KV, device=q.device)[:, None].expand(KV, G)
        k_vert = vk[:, kv_of_head, self.head_slot].flatten(1, 2)  # [b, H, n, d]: head g*G + j reads its slot
        v_vert = vv[:, kv_of_head, self.head_slot].flatten(1, 2)
        return _fused_attention(q, start // B, k_band, v_band, k_vert, v_vert, self.pattern, scale,
                                chunk_blocks, band_blocks)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of q [b, H, Tq, d] (positions q_pos [b, Tq]) over the cached past plus this chunk's
        own k, v [b, KV, Tq, d]; then the chunk is written to the cache. -> [b, H, Tq, d].

        Keys come from three places, each masked so every allowed key counts exactly once, and one
        softmax runs over all three (in fp32):
        - the ring (past band only), shared by a KV head's G query heads: their queries stacked;
        - the vertical store (past, outside the band): each query head reads only its own phase's slot,
          the queries of the heads on one slot stacked ([b, KV, P, M·Tq, d] against [b, KV, P, n, d]);
        - the chunk itself (allowed by the pattern).
        """
        p, B, NL = self.pattern, self.pattern.block, self.pattern.local_blocks
        b, H, Tq, d = q.shape
        KV = k.shape[1]
        G = H // KV
        P, M = self.slot_heads.shape[1:]
        neg = float("-inf")
        qg = q.reshape(b, KV, G * Tq, d)  # [b, KV, G*Tq, d]: the query heads of each KV head together
        qb = (q_pos // B)[:, None, :, None]  # [b, 1, Tq, 1]
        q_ok = (q_pos >= 0)[:, None, :, None]

        # ring: [b, KV, G, Tq, R], the same mask for every head
        ring_pos = self.ring_pos[:, None, None, :]  # [b, 1, 1, R]
        ring_ok = q_ok & (ring_pos >= 0) & (ring_pos <= q_pos[:, None, :, None]) & (qb - ring_pos // B < NL)
        s_ring = torch.matmul(self.ring_k, qg.transpose(-1, -2)).transpose(-1, -2).float().reshape(b, KV, G, Tq, self.R)
        s_ring = s_ring.mul_(scale).masked_fill_(~ring_ok[:, :, None], neg)

        # vertical: per slot, its heads' queries stacked: [b, KV, P, M*Tq, d] (a padding entry repeats head 0; its rows are never read back)
        vk, vv, vpos = self._vertical_view()  # [b, KV, P, n, d], [KV, P, n]
        n = vpos.shape[-1]
        heads = self.slot_heads.clamp(min=0)  # [KV, P, M]
        kv_idx = torch.arange(KV, device=q.device)[:, None, None]
        q_slot = qg.view(b, KV, G, Tq, d)[:, kv_idx, heads]  # [b, KV, P, M, Tq, d]
        s_vert = torch.matmul(vk, q_slot.reshape(b, KV, P, M * Tq, d).transpose(-1, -2)).transpose(-1, -2).float()
        s_vert = s_vert.mul_(scale).view(b, KV, P, M, Tq, n)
        vpos = vpos[None, :, :, None, None, :]  # [1, KV, P, 1, 1, n]
        vert_ok = ((vpos >= 0) & (vpos < self.lengths[:, None, None, None, None, None])
                   & (qb[:, :, None, None] - vpos // B >= NL) & q_ok[:, :, None, None])  # [b, KV, P, 1, Tq, n]
        s_vert.masked_fill_(~vert_ok, neg)
        # back to heads: head j of KV head g is row head_row[g, j] of slot head_slot[g, j]
        s_vert_h = s_vert[:, kv_idx[..., 0], self.head_slot, self.head_row]  # [b, KV, G, Tq, n]

        # the chunk itself: [b, KV, G, Tq, Tq]
        new_ok = p.allowed(q_pos, q_pos).view(b, KV, G, Tq, Tq)
        s_new = torch.matmul(qg, k.transpose(-1, -2)).float().view(b, KV, G, Tq, Tq)
        s_new = s_new.mul_(scale).masked_fill_(~new_ok, neg)

        probs = torch.cat([s_ring, s_vert_h, s_new], -1).softmax(-1).nan_to_num_(0.0).to(q.dtype)  # no key: 0
        p_ring, p_vert, p_new = probs.split([self.R, n, Tq], -1)
        out = torch.matmul(p_ring.reshape(b, KV, G * Tq, self.R), self.ring_v)  # [b, KV, G*Tq, d]
        out = out + torch.matmul(p_new.reshape(b, KV, G * Tq, Tq), v)
        out = out.view(b, KV, G, Tq, d)
        # vertical values per slot: the probabilities of a slot's heads stacked like their queries
        p_slot = p_vert[:, kv_idx, heads]  # [b, KV, P, M, Tq, n]; rows of padding heads are never read back
        o_slot = torch.matmul(p_slot.reshape(b, KV, P, M * Tq, n), vv).view(b, KV, P, M, Tq, d)
        out = out + o_slot[:, kv_idx[..., 0], self.head_slot, self.head_row]
        self.write(k, v, q_pos)
        return out.reshape(b, H, Tq, d)
