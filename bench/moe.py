"""Decode speed of a scaled-down Phi-3.5-MoE vs a dense Phi-3 with the same active parameters.

MoE: 16 experts of intermediate size I, top-2 SparseMixer routing, grouped dispatch. Dense: the same
attention and hidden size with one MLP of intermediate 2·I (= the two active experts). Random weights,
fp32, greedy decoding through the shared generator; both measured in the same run.

    .venv/bin/python bench/moe.py
"""

from __future__ import annotations

import argparse
import time

import torch

from phi3.checkpoint import model_class
from phi3.config import config_from_hf_dict
from phi3.generate import SamplingParams, generate_tokens


def configs(hidden: int, inter: int, layers: int, experts: int) -> tuple[dict, dict]:
    common = {"vocab_size": 32064, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
              "num_key_value_heads": hidden // 256, "max_position_embeddings": 4096, "rope_theta": 10000.0,
              "bos_token_id": 1, "eos_token_id": 2}
    moe = dict(common, model_type="phimoe", intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=2,
               attention_bias=True, lm_head_bias=True)
    dense = dict(common, model_type="phi3", intermediate_size=2 * inter)
    return moe, dense


def build(raw: dict) -> torch.nn.Module:
    cfg = config_from_hf_dict(raw, "bench")
    model = model_class(cfg)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.05)
    return model


def decode_rate(model, prompt: list[int], new_tokens: int, repeat: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=frozenset())
    best = float("inf")
    for _ in range(repeat):
        gen = generate_tokens(model, [prompt], params)
        next(gen)  # prefill + first token excluded
        t = time.perf_counter()
        n = sum(1 for _ in gen)
        best = min(best, (time.perf_counter() - t) / n)
    return 1.0 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=1024, help="per expert")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe_raw, dense_raw = configs(args.hidden, args.intermediate, args.layers, args.experts)
    moe, dense = build(moe_raw), build(dense_raw)
    active_moe = moe.config.active_parameters()
    active_dense = dense.config.num_parameters()
    prompt = torch.randint(3, 32000, (16,)).tolist()
    rows = [("dense", dense, active_dense, dense.config.num_parameters()),
            ("moe", moe, active_moe, moe.config.num_parameters())]
    print(f"hidden {args.hidden}, {args.layers} layers, {args.experts} experts x {args.intermediate} (top-2) vs dense "
          f"intermediate {2 * args.intermediate}; fp32, {torch.get_num_threads()} threads, {args.new_tokens} decode steps")
    print(f"{'model':>6} | {'active params':>13} | {'total params':>12} | {'decode tok/s':>12}")
    rates = {}
    for name, model, active, total in rows:
        rates[name] = decode_rate(model, prompt, args.new_tokens, args.repeat)
        print(f"{name:>6} | {active / 1e6:>11.1f} M | {total / 1e6:>10.1f} M | {rates[name]:>12.1f}", flush=True)
    print(f"MoE / dense decode speed: {rates['moe'] / rates['dense']:.2f}x")


if __name__ == "__main__":
    main()
