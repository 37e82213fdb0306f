"""Phi-3-small against a plain reference written straight from the spec (§2.2-2.5): dense attention with the
explicit block-sparse mask, K/V repeat_interleave'd, no cache. Random weights on a scaled-down config."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from phi3.checkpoint import build_model, load_hf_checkpoint, quantize_to_checkpoint, save_hf_checkpoint
from phi3.config import config_from_hf_dict, load_preset
from phi3.errors import ConfigError
from phi3.generate import SamplingParams, generate_tokens
from phi3.models.phi3small import Phi3SmallConfig, Phi3SmallForCausalLM, gegelu
from phi3.quant import quantize_model

PRESET = "phi-3-small-8k-instruct"


def small_config(**over) -> dict:
    """The 8k preset scaled down: GQA 4:1, block 8 / 3 local blocks / vertical stride 4, 4 layers (2 sparse)."""
    raw = json.loads(load_preset(PRESET).raw and json.dumps(load_preset(PRESET).raw))
    raw.update(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, ff_intermediate_size=48,
               num_hidden_layers=4, vocab_size=128, max_position_embeddings=256, blocksparse_block_size=8,
               blocksparse_num_local_blocks=3, blocksparse_vert_stride=4, rope_embedding_base=10000.0,
               bos_token_id=1, eos_token_id=2, dummy_token_indices=[3, 7] + list(range(120, 128)),
               gegelu_limit=1.5)  # a small clamp limit, so random activations do hit it
    raw.update(over)
    return raw


def random_state_dict(cfg: Phi3SmallConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Phi3SmallForCausalLM(cfg).state_dict().items()}
    sd = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":
            continue  # tied
        t = torch.randn(shape) * (0.5 if name.endswith("bias") else 0.2)
        sd[name] = 1 + t if "layernorm" in name and name.endswith("weight") else t
    return sd


# ---- the reference, from the spec alone ------------------------------------------------------------
def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def spec_mask(raw, layer, T):
    n = raw["dense_attention_every_n_layers"]
    causal = torch.ones(T, T).tril().bool()
    if (layer + 1) % n == 0:
        return causal.expand(raw["num_attention_heads"], T, T)
    B, NL, V, H = (raw["blocksparse_block_size"], raw["blocksparse_num_local_blocks"], raw["blocksparse_vert_stride"],
                   raw["num_attention_heads"])
    step = max(1, int(V / H))
    nb = math.ceil(T / B)
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    blocks = torch.stack([(qb >= kb) & ((qb - kb < NL) | ((kb + h * step + 1) % V == 0)) for h in range(H)])
    return torch.kron(blocks.int(), torch.ones(B, B, dtype=torch.int)).bool()[:, :T, :T] & causal


def reference_logits(raw: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    D, H, KV, L = raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"], raw["num_hidden_layers"]
    d, G, eps, lim = D // H, H // KV, raw["layer_norm_epsilon"], raw["gegelu_limit"]
    b, T = ids.shape
    ln = lambda x, name: F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"], eps)  # noqa: E731
    lin = lambda x, name: x @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    h = sd["model.embed_tokens.weight"][ids] * raw["mup_embedding_multiplier"]
    inv_freq = 1.0 / raw["rope_embedding_base"] ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(T).float()[:, None] * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    for l in range(L):
        p = f"model.layers.{l}."
        qkv = lin(ln(h, p + "input_layernorm"), p + "self_attn.query_key_value").view(b, T, KV, G + 2, d)
        q = qkv[:, :, :, :G].reshape(b, T, H, d).transpose(1, 2)  # query head 4g+j in group g
        k = qkv[:, :, :, G].transpose(1, 2).repeat_interleave(G, dim=1)
        v = qkv[:, :, :, G + 1].transpose(1, 2).repeat_interleave(G, dim=1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2)) * (1 / (d / raw["mup_attn_multiplier"]))
        scores = scores.masked_fill(~spec_mask(raw, l, T), float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, T, D)
        h = h + lin(att, p + "self_attn.dense")
        y = lin(ln(h, p + "post_attention_layernorm"), p + "mlp.up_proj")
        a_gelu, a_lin = y[..., 0::2].clamp(max=lim), y[..., 1::2].clamp(-lim, lim)
        h = h + lin(a_gelu * torch.sigmoid(1.702 * a_gelu) * (a_lin + 1), p + "mlp.down_proj")
    h = ln(h, "model.final_layernorm")
    logits = (h @ sd["model.embed_tokens.weight"].T).float() / raw["mup_width_multiplier"]
    logits[..., raw["dummy_token_indices"]] = torch.finfo(torch.float32).min
    return logits


def make(**over):
    raw = small_config(**over)
    cfg = config_from_hf_dict(raw)
    sd = random_state_dict(cfg)
    return raw, sd, build_model(cfg, sd, torch.float32)


# ---- tests ---------------------------------------------------------------------------------------
def test_release_preset():
    cfg = load_preset(PRESET)
    assert isinstance(cfg, Phi3SmallConfig) and cfg.tie_word_embeddings
    assert (cfg.head_dim, cfg.intermediate_size, cfg.num_key_value_heads, cfg.rope_theta) == (128, 14336, 8, 1e6)
    assert cfg.attention_scale == 1 / 128
    assert [cfg.is_dense_layer(i) for i in range(4)] == [False, True, False, True]
    assert abs(cfg.num_parameters() / 1e9 - 7.39) < 0.01
    assert len(cfg.dummy_token_indices) == 6 + 85 and cfg.dummy_token_indices[-1] == 100351


def test_bad_config_fields_are_named():
    with pytest.raises(ConfigError, match="ff_intermediate_size"):
        config_from_hf_dict(small_config(ff_intermediate_size=None))
    with pytest.raises(ConfigError, match="hidden_act"):
        config_from_hf_dict(small_config(hidden_act="gelu"))
    with pytest.raises(ConfigError, match="blocksparse_vert_stride"):
        config_from_hf_dict(small_config(blocksparse_vert_stride=0))
    with pytest.raises(ConfigError, match="dummy_token_indices"):
        config_from_hf_dict(small_config(dummy_token_indices=[500]))


def test_gegelu_clamps_and_keeps_infinities():
    y = torch.tensor([30.0, 30.0, -30.0, -30.0, float("inf"), float("-inf"), 1.0, 2.0])
    got = gegelu(y, 20.0)
    qg = lambda x: x * torch.sigmoid(torch.tensor(1.702 * x))  # noqa: E731
    assert got[0] == qg(20.0) * 21 and got[1] == qg(-30.0) * (-19)
    assert got[2] == float("-inf")  # +inf on the gelu branch is not clamped to 20 (which would be finite)
    assert torch.isclose(got[3], qg(1.0) * 3)


@pytest.mark.parametrize("T", [5, 24, 61, 130])  # inside the band (3 blocks of 8), past it, several vertical blocks
def test_logits_match_spec_reference(T):
    raw, sd, ours = make()
    ids = torch.randint(0, 128, (2, T))
    with torch.no_grad():
        expected = reference_logits(raw, sd, ids)
        got = ours(ids)
    assert (got - expected).abs().max() < 1e-4
    assert (got[..., 7] == torch.finfo(torch.float32).min).all()


def test_sparse_layers_are_really_sparse():
    """Changing a token outside the band and off every head's vertical blocks changes nothing in a
    one-layer sparse model; the same change reaches the last query in a dense one."""
    raw, sd, ours = make(num_hidden_layers=1)
    dense_raw, _, dense = make(num_hidden_layers=1, dense_attention_every_n_layers=1)
    dense.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 120, (1, 80))  # last query in block 9; band = blocks 7-9
    vertical_blocks = {kb for kb in range(10) if any((kb + h + 1) % 4 == 0 for h in range(8))}
    assert vertical_blocks == set(range(10))  # 8 heads, stride 4: every block is vertical for some head
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 120
    with torch.no_grad():
        assert not torch.equal(ours(ids)[0, -1], ours(changed)[0, -1])  # seen through a vertical block
    # homogeneous pattern: only blocks 3, 7 are vertical; token 40 (block 5) is invisible from block 9
    _, _, homo = make(num_hidden_layers=1, blocksparse_homo_head_pattern=True)
    homo.load_state_dict(ours.state_dict())
    changed = ids.clone()
    changed[0, 40] = (changed[0, 40] + 1) % 120
    with torch.no_grad():
        assert torch.equal(homo(ids)[0, -1], homo(changed)[0, -1])
        assert not torch.equal(dense(ids)[0, -1], dense(changed)[0, -1])


def test_greedy_decode_with_cache_equals_without():
    raw, sd, ours = make()
    prompts = [torch.randint(8, 120, (37,)).tolist(), torch.randint(8, 120, (20,)).tolist()]
    steps = list(generate_tokens(ours, prompts, SamplingParams(max_new_tokens=24)))
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(24):  # no cache: the whole sequence every step, through the reference
            with torch.no_grad():
                seq.append(int(reference_logits(raw, sd, torch.tensor([seq]))[0, -1].argmax()))
        assert [s[row] for s in steps] == seq[len(prompt):]


def test_cache_memory_of_sparse_layers():
    _, _, ours = make(blocksparse_vert_stride=8)  # like the release: a KV head's 4 query heads use 4 of 8 phases
    cache = ours.new_cache(1, 256)
    sparse, total = cache.nbytes(sparse_only=True), cache.nbytes()
    dense_layer = 2 * 2 * 256 * 8 * 4  # k and v, 2 KV heads, 256 positions, head_dim 8, fp32
    # 2 sparse layers, each a 24-position ring + half of the blocks (4 of 8 phases per KV head)
    assert sparse == 2 * 2 * 2 * (24 + 256 // 2) * 8 * 4
    assert total - sparse == 2 * dense_layer


def test_checkpoint_round_trip_keeps_original_names_and_tied_head(tmp_path):
    _, sd, ours = make()
    save_hf_checkpoint(ours, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(sd)  # original tensor names, no lm_head
    back = load_hf_checkpoint(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "phi3small"
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))


def test_missing_tensor_is_named():
    raw, sd, _ = make()
    del sd["model.layers.2.mlp.up_proj.bias"]
    with pytest.raises(Exception, match="model.layers.2.mlp.up_proj.bias"):
        build_model(config_from_hf_dict(raw), sd, torch.float32)


def test_quantized(tmp_path):
    _, _, ours = make()
    ids = torch.randint(0, 120, (1, 30))
    quantize_to_checkpoint(copy.deepcopy(ours), tmp_path / "streamed", bits=8, group_size=32)  # `phi3 quantize`'s way
    with torch.no_grad():
        base = ours(ids)
        quantize_model(ours, bits=8, group_size=32)
        q = ours(ids)
    assert type(ours.model.layers[0].self_attn.query_key_value).__name__ == "Int8Linear"
    keep = base > -1e30
    assert ((q - base)[keep].norm() / base[keep].norm()) < 0.05
    save_hf_checkpoint(ours, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_hf_checkpoint(tmp_path)(ids), q)
        assert torch.equal(load_hf_checkpoint(tmp_path / "streamed")(ids), q)


def test_runs_through_phi3_load_and_the_cli(tmp_path, capsys):
    """Full 100352-token vocabulary with the cl100k_base tokenizer: phi3.load(dir) and `phi3 generate --model DIR`."""
    import phi3
    from phi3.cli import main
    from phi3.tiktoken_tokenizer import Phi3SmallTokenizer

    _, _, ours = make(vocab_size=100352, dummy_token_indices=None)
    save_hf_checkpoint(ours, tmp_path, tokenizer=Phi3SmallTokenizer())
    lm = phi3.load(tmp_path)
    assert isinstance(lm.model, Phi3SmallForCausalLM) and isinstance(lm.tokenizer, Phi3SmallTokenizer)
    prompt = lm.encode("The sky is")
    no_stop = frozenset()
    expected = [s[0] for s in generate_tokens(ours, [prompt], SamplingParams(max_new_tokens=6, stop_token_ids=no_stop))]
    assert all(t not in ours.config.dummy_token_indices for t in expected)  # masked logits are never chosen
    text = lm.generate("The sky is", max_new_tokens=6, stop_token_ids=no_stop)
    assert text.strip() == lm.tokenizer.decode(expected).strip()
    assert lm.chat_prompt("Hi")[:2] == [100257, 100262]
    assert main(["generate", "The sky is", "--model", str(tmp_path), "-n", "6", "-t", "0"]) == 0
    assert capsys.readouterr().out.strip() == lm.generate("The sky is", max_new_tokens=6).strip()


def test_bf16_decode_through_the_cache_follows_the_full_forward():
    """bf16 weights and cache: the dense layers' decode runs on the native attention kernel with
    phi-3-small's muP scale (not 1/√d), the sparse ones on the sparse cache; each step's logits
    equal those of the whole sequence run again without a cache, up to bf16 rounding."""
    raw, sd, _ = make()
    cfg = config_from_hf_dict(raw)
    ours = build_model(cfg, sd, torch.bfloat16)
    seq = torch.randint(8, 120, (1, 70))
    with torch.no_grad():
        cache = ours.new_cache(1, 80)
        assert cache.layers[1].k.dtype == torch.bfloat16  # layer 1 is dense: (1 + 1) % 2 == 0
        ours(seq[:, :60], torch.arange(60)[None], cache=cache)
        worst = 0.0
        for i in range(60, 70):
            step = ours(seq[:, i:i + 1], torch.tensor([[i]]), cache=cache)[0, -1].float()
            full = ours(seq[:, :i + 1])[0, -1].float()
            ok = full > torch.finfo(torch.float32).min  # the dummy tokens' logits are masked alike
            worst = max(worst, float((step - full)[ok].abs().max() / full[ok].abs().max()))
    assert worst < 0.02


def test_a_long_prompt_prefilled_in_chunks_takes_the_fused_path(monkeypatch):
    """`generate`'s prefill goes chunk by chunk; every chunk after the first continues the sparse
    layers' caches through `SparseKVCache.prefill_chunk` (the fused kernel), and the logits are the
    reference's."""
    from phi3.blocksparse import SparseKVCache
    from phi3.generate import prefill

    raw, sd, ours = make()
    calls = []
    original = SparseKVCache.prefill_chunk
    monkeypatch.setattr(SparseKVCache, "prefill_chunk", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    ids = torch.randint(8, 120, (1, 150))
    with torch.no_grad():
        cache = ours.new_cache(1, 160)
        got = prefill(ours, ids, torch.arange(150)[None], cache, seq_len=150, chunk=32)
        expected = reference_logits(raw, sd, ids)[:, -1]
    assert len(calls) == 2 * 4  # 2 sparse layers x the 4 chunks after the first
    assert (got - expected).abs().max() < 1e-4
