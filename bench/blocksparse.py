"""Block-sparse vs dense attention for a Phi-3-small-shaped layer: prefill time, decode time per token, KV bytes.

One attention layer (query_key_value + RoPE + attention + dense, random weights, fp32) with the release's
head_dim 128, GQA 4:1 and pattern (block 64, 16 local blocks, vertical stride 8; with 8 heads the
phase step is 1, as with the release's 32). Fewer heads than the release (default 8 of 32) keep it
runnable on a small CPU; attention cost is linear in heads, so the sparse/dense ratios do not depend on it.
Dense is the fastest dense path: SDPA with is_causal for prefill; for decode, the attention over the
full cache that phi-3-small's dense layers run (`phi3.layers.attention`: a KV head's query heads
stacked, 4-5x faster for one token than SDPA's own `enable_gqa`). `--chunked` also times both prefills
the way `generate` runs a prompt: PREFILL_CHUNK tokens a call, each continuing the cache (sparse:
`SparseKVCache.prefill_chunk`). Both sides are measured in the same run.

    .venv/bin/python bench/blocksparse.py --lengths 4096 16384 32768 [--chunked]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from phi3.blocksparse import SparseKVCache, SparsePattern, blocksparse_prefill
from phi3.generate import PREFILL_CHUNK
from phi3.layers import KVCache, RotaryEmbedding, apply_rotary, attention, attention_mask
from phi3.models.phi3small import Phi3SmallConfig, SmallAttention


def layer_config(heads: int, max_len: int) -> Phi3SmallConfig:
    raw = {"model_type": "phi3small", "hidden_size": heads * 128, "num_attention_heads": heads,
           "num_key_value_heads": heads // 4, "ff_intermediate_size": 256, "num_hidden_layers": 2,
           "vocab_size": 256, "max_position_embeddings": max_len, "rope_embedding_base": 1e6}
    return Phi3SmallConfig.from_hf_dict(raw, "bench")


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def run(T: int, heads: int, decode_steps: int, chunked: bool) -> dict:
    cfg = layer_config(heads, T + decode_steps)
    attn = SmallAttention(cfg, layer=0)  # the projections; attention itself is called explicitly below
    for p in attn.parameters():
        p.normal_(0, 0.02)
    rotary = RotaryEmbedding(cfg)
    pattern: SparsePattern = cfg.pattern
    x = torch.randn(1, T + decode_steps, cfg.hidden_size)
    pos = torch.arange(T + decode_steps)[None]
    cos, sin = rotary(pos, T, torch.float32)
    KV = cfg.num_key_value_heads

    def project(lo, hi):
        q, k, v = attn.split_heads(attn.query_key_value(x[:, lo:hi]))
        c, s = cos[:, :, lo:hi], sin[:, :, lo:hi]
        return apply_rotary(q, c, s), apply_rotary(k, c, s), v

    def out_proj(o):
        return attn.dense(o.transpose(1, 2).reshape(1, o.shape[2], -1))

    dense_cache = KVCache(1, KV, T + decode_steps, 128, torch.float32)
    sparse_cache = SparseKVCache(1, KV, T + decode_steps, 128, pattern, torch.float32)

    def prefill_dense():
        q, k, v = project(0, T)
        dense_cache.update(0, k, v)
        return out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.attention_scale, enable_gqa=True))

    def prefill_sparse():
        sparse_cache.reset()
        q, k, v = project(0, T)
        out = blocksparse_prefill(q, k, v, pattern, cfg.attention_scale)
        sparse_cache.write(k, v, pos[:, :T])
        return out_proj(out)

    def prefill_dense_chunked():  # as `generate` prefills: PREFILL_CHUNK tokens a call, over the cache
        for lo in range(0, T, PREFILL_CHUNK):
            hi = min(T, lo + PREFILL_CHUNK)
            q, k, v = project(lo, hi)
            kk, vv = dense_cache.update(lo, k, v)
            out_proj(attention(q, kk, vv, attention_mask(pos[:, lo:hi], pos[:, :hi], None), scale=cfg.attention_scale))

    def prefill_sparse_chunked():  # the first chunk fresh, the others continuing the sparse cache
        sparse_cache.reset()
        for lo in range(0, T, PREFILL_CHUNK):
            hi = min(T, lo + PREFILL_CHUNK)
            q, k, v = project(lo, hi)
            if lo == 0:
                out = blocksparse_prefill(q, k, v, pattern, cfg.attention_scale)
                sparse_cache.write(k, v, pos[:, :hi])
            else:
                assert sparse_cache.can_prefill_chunk(q, pos[:, lo:hi])
                out = sparse_cache.prefill_chunk(q, k, v, pos[:, lo:hi], cfg.attention_scale)
            out_proj(out)

    def decode_dense():
        for i in range(T, T + decode_steps):
            q, k, v = project(i, i + 1)
            kk, vv = dense_cache.update(i, k, v)
            out_proj(attention(q, kk, vv, None, scale=cfg.attention_scale))

    def decode_sparse():
        for i in range(T, T + decode_steps):
            q, k, v = project(i, i + 1)
            out_proj(sparse_cache.attend(q, k, v, pos[:, i:i + 1], cfg.attention_scale))

    # correctness on the way: the last prefill rows agree
    a, b = prefill_dense(), prefill_sparse()
    if T <= pattern.block * pattern.local_blocks:
        assert (a - b).abs().max() < 1e-4
    res = {"T": T, "prefill_dense": timed(prefill_dense), "prefill_sparse": timed(prefill_sparse)}
    if chunked:
        res.update(chunked_dense=timed(prefill_dense_chunked), chunked_sparse=timed(prefill_sparse_chunked))
    prefill_sparse()  # fill the sparse cache again (decode below writes into both caches)
    ring_pos, lengths = sparse_cache.ring_pos.clone(), sparse_cache.lengths.clone()
    res["decode_dense"] = timed(decode_dense) / decode_steps
    sparse_cache.ring_pos.copy_(ring_pos), sparse_cache.lengths.copy_(lengths)
    res["decode_sparse"] = timed(decode_sparse) / decode_steps
    kv_dense = 2 * KV * T * 128 * 4  # what a dense layer holds at T tokens (fp32)
    B, V = pattern.block, pattern.vert_stride
    kept_blocks = sparse_cache.vert_k.shape[2]  # phase slots per KV head
    kv_sparse = 2 * KV * (sparse_cache.R + -(-T // (V * B)) * kept_blocks * B) * 128 * 4  # ring + used vertical store
    res.update(kv_dense=kv_dense, kv_sparse=kv_sparse)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--heads", type=int, default=8, help="query heads (KV heads = heads/4); the release has 32")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunked", action="store_true",
                    help=f"also prefill in {PREFILL_CHUNK}-token chunks over the cache, as `generate` does")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"Phi-3-small-shaped attention layer: {args.heads} heads / {args.heads // 4} KV heads, head_dim 128, "
          f"block 64, 16 local blocks, stride 8; fp32, {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} | {'prefill dense':>13} {'sparse':>8} {'speed-up':>8} | {'decode dense':>12} {'sparse':>8} "
          f"{'speed-up':>8} | {'KV dense':>9} {'sparse':>9} {'ratio':>6}")
    for T in args.lengths:
        r = run(T, args.heads, args.decode_steps, args.chunked)
        print(f"{T:>7} | {r['prefill_dense']:>11.2f} s {r['prefill_sparse']:>6.2f} s {r['prefill_dense'] / r['prefill_sparse']:>7.2f}x"
              f" | {r['decode_dense'] * 1e3:>9.2f} ms {r['decode_sparse'] * 1e3:>5.2f} ms {r['decode_dense'] / r['decode_sparse']:>7.2f}x"
              f" | {r['kv_dense'] / 2**20:>6.1f} MiB {r['kv_sparse'] / 2**20:>5.1f} MiB {r['kv_sparse'] / r['kv_dense']:>6.3f}", flush=True)
        if args.chunked:
            print(f"{'':>7}   prefill in {PREFILL_CHUNK}-token chunks: dense {r['chunked_dense']:.2f} s, sparse "
                  f"{r['chunked_sparse']:.2f} s, {r['chunked_dense'] / r['chunked_sparse']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
