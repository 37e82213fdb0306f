"""Phi-3.5-MoE: logit parity with transformers' PhimoeForCausalLM on random weights, SparseMixer routing,
grouped expert dispatch, cache, generator, checkpoints and quantization."""

import copy
import json

import pytest
import torch
import transformers

from phi3.checkpoint import build_model, load_hf_checkpoint, quantize_to_checkpoint, save_hf_checkpoint
from phi3.config import config_from_hf_dict, load_preset
from phi3.errors import ConfigError
from phi3.generate import SamplingParams, generate_tokens
from phi3.models.phi3 import Cache
from phi3.models.phimoe import PhiMoEConfig, PhiMoEForCausalLM, dispatch_grouped, sparsemixer_top2
from phi3.quant import quantize_model

from ..conftest import scaled_down

L0 = 16
MSCALE = 1.243163121016122  # the release's short_mscale = long_mscale


def small_config(**over) -> dict:
    """A scaled-down Phi-3.5-MoE config.json: GQA 4:1, 4 experts, LongRoPE 8x with the release's mscale."""
    rot = 8  # head_dim 16 -> 8 factors
    cfg = {
        "architectures": ["PhimoeForCausalLM"], "model_type": "phimoe", "vocab_size": 96, "hidden_size": 64,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 8 * L0,
        "original_max_position_embeddings": L0, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "router_jitter_noise": 0.01, "input_jitter_noise": 0.01, "attention_bias": True, "lm_head_bias": True,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(rot)],
                         "long_factor": [1.5 + 0.5 * i for i in range(rot)], "short_mscale": MSCALE,
                         "long_mscale": MSCALE, "original_max_position_embeddings": L0},
        "initializer_range": 0.1,
    }
    cfg.update(over)
    return cfg


def to_original_names(hf_sd: dict, cfg: PhiMoEConfig) -> dict:
    """transformers 5.x fuses experts at load time; the checkpoint on disk has per-expert w1/w2/w3."""
    out = {}
    for name, t in hf_sd.items():
        if ".mlp.experts.gate_up_proj" in name:
            stem = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(t.shape[0]):
                w1, w3 = t[e].chunk(2, dim=0)
                out[f"{stem}.{e}.w1.weight"], out[f"{stem}.{e}.w3.weight"] = w1, w3
        elif ".mlp.experts.down_proj" in name:
            stem = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(t.shape[0]):
                out[f"{stem}.{e}.w2.weight"] = t[e]
        elif ".mlp.router.weight" in name:
            out[name.replace(".mlp.router.weight", ".block_sparse_moe.gate.weight")] = t
        else:
            out[name] = t
    return out


def hf_rotary_follows_seq_len(ref):
    """transformers 5.23's PhimoeRotaryEmbedding rebuilds inv_freq without the sequence length, so it
    never switches to the long factors (only the mscale switches), unlike its own longrope rule and the
    spec (§1.4, §3.2). Patch its forward to pass seq_len to that same init function."""
    rot = ref.model.rotary_emb
    original = rot.rope_init_fn

    def init_with_seq_len(config, *args, **kwargs):
        return original(config, seq_len=rot._seq_len)

    def forward(x, position_ids=None):
        rot._seq_len = int(position_ids.max()) + 1
        return type(rot).forward(rot, x, position_ids)

    rot.rope_init_fn = init_with_seq_len
    rot.forward = forward


def make_pair(patch_rope=True, **over):
    raw = small_config(**over)
    ref = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**raw)).eval()
    if patch_rope:
        hf_rotary_follows_seq_len(ref)
    cfg = config_from_hf_dict(raw)
    ours = build_model(cfg, to_original_names(ref.state_dict(), cfg), torch.float32)
    return ref, ours


def test_config_reads_moe_fields_and_rejects_bad_ones():
    cfg = config_from_hf_dict(small_config())
    assert isinstance(cfg, PhiMoEConfig) and cfg.layout == "phimoe"
    assert (cfg.num_local_experts, cfg.attention_bias, cfg.lm_head_bias) == (4, True, True)
    assert cfg.short_mscale == cfg.long_mscale == MSCALE and cfg.is_longrope
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        config_from_hf_dict(small_config(num_experts_per_tok=3))
    with pytest.raises(ConfigError, match="num_local_experts"):
        config_from_hf_dict(small_config(num_local_experts="16"))
    with pytest.raises(ConfigError, match="long_mscale"):
        config_from_hf_dict(small_config(rope_scaling=dict(small_config()["rope_scaling"], long_mscale=-1)))


def test_sparsemixer_matches_spec_formula():
    """Each weight is the softmax over the experts within a relative gap 2ε of that round's leader."""
    scores = torch.randn(300, 8) * 0.05  # small logits: many experts fall inside the 2ε band
    scores[:5] = torch.tensor([3.0, 2.99, 0.1, -1.0, 2.0, 1.0, 0.0, 2.995])  # a near tie
    eps = 0.01
    w, e = sparsemixer_top2(scores, eps)
    for n in range(scores.shape[0]):
        s = scores[n]
        i1 = int(s.argmax())
        keep1 = (s[i1] - s) / torch.maximum(s.abs(), s[i1]) <= 2 * eps
        w1 = torch.softmax(s.masked_fill(~keep1, float("-inf")), 0)[i1]
        s2 = s.clone()
        s2[i1] = float("-inf")
        i2 = int(s2.argmax())
        keep2 = ((s2[i2] - s) / torch.maximum(s.abs(), s2[i2]) <= 2 * eps) & (torch.arange(8) != i1)
        w2 = torch.softmax(s2.masked_fill(~keep2, float("-inf")), 0)[i2]
        assert e[n].tolist() == [i1, i2]
        assert torch.allclose(w[n], torch.stack([w1, w2]), atol=1e-6)
    assert (w.sum(-1) > 1.01).any(), "no renormalisation: weights of a clear leader sum to about 2"


def test_grouped_dispatch_equals_per_token_loop_and_calls_each_expert_once():
    _, ours = make_pair()
    moe = ours.model.layers[0].block_sparse_moe
    x = torch.randn(37, 64)
    weights, chosen = sparsemixer_top2(moe.gate(x), moe.eps)
    calls = []
    hooks = [ex.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0]))) for e, ex in enumerate(moe.experts)]
    with torch.no_grad():
        got = dispatch_grouped(x, weights, chosen, moe.experts)
    for h in hooks:
        h.remove()
    expected = torch.stack([sum(weights[n, k] * moe.experts[int(chosen[n, k])](x[n]) for k in range(2)) for n in range(37)])
    assert (got - expected).abs().max() < 1e-5
    counts = torch.bincount(chosen.flatten(), minlength=4)
    assert sorted(calls) == [(e, int(c)) for e, c in enumerate(counts) if c > 0]  # one call per used expert


@pytest.mark.parametrize("t", [5, L0, L0 + 1, 3 * L0 + 5])
def test_logits_match_transformers(t):
    ref, ours = make_pair()
    ids = torch.randint(0, 96, (2, t))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    diff = (expected - got).abs().max().item()
    assert diff < 1e-4, f"T={t}: max |Δlogit| = {diff}"


def test_logits_match_unpatched_transformers_up_to_l0_and_long_factors_matter_past_it():
    ref, ours = make_pair(patch_rope=False)
    ids = torch.randint(0, 96, (1, 2 * L0))
    with torch.no_grad():
        assert (ref(ids[:, :L0]).logits - ours(ids[:, :L0])).abs().max() < 1e-4
        # past L0, unpatched transformers 5.23 keeps the short factors; the spec (and we) switch
        assert (ref(ids).logits - ours(ids)).abs().max() > 1e-3


def test_sliding_window_matches_transformers():
    ref, ours = make_pair(sliding_window=9)
    ids = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() < 1e-4


def test_cache_decode_and_greedy_generation():
    ref, ours = make_pair()
    t = L0
    ids = torch.randint(0, 96, (2, t))
    with torch.no_grad():
        full = ours(ids)
        cache = Cache(ours, batch=2, max_len=t)
        pos = torch.arange(t).expand(2, t)
        parts = [ours(ids[:, :5], pos[:, :5], cache)] + [ours(ids[:, i:i + 1], pos[:, i:i + 1], cache) for i in range(5, t)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4
    # greedy through the shared generator crosses L0 (cache recomputed under the long factors)
    prompt = torch.randint(3, 96, (10,)).tolist()
    steps = [s[0] for s in generate_tokens(ours, [prompt], SamplingParams(max_new_tokens=12))]
    out = ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    assert steps == out[0, 10:].tolist()


def test_checkpoint_round_trip_with_original_names(tmp_path):
    _, ours = make_pair()
    save_hf_checkpoint(ours, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names and "lm_head.bias" in names
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "phimoe"
    back = load_hf_checkpoint(tmp_path)
    assert isinstance(back, PhiMoEForCausalLM)
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts(tmp_path, bits):
    """Every linear (experts included) is swapped; an MoE block equals the float block carrying the
    dequantized weights, up to the kernels' activation rounding (int8 blocks of 32 as llama.cpp's
    Q8_0, or bf16 for torch's kernels; same input, so the same routing): two matmuls in a row, each
    about 0.5–1 % off on these small random shapes."""
    _, ours = make_pair()
    dequantized, fresh = copy.deepcopy(ours), copy.deepcopy(ours)
    ids = torch.randint(0, 96, (1, 12))
    x = torch.randn(1, 40, 64)
    with torch.no_grad():
        quantize_model(ours, bits=bits, group_size=32)
        for name, m in ours.named_modules():
            if hasattr(m, "dequantize"):
                dequantized.get_submodule(name).weight.copy_(m.dequantize())
        got = ours.model.layers[1].block_sparse_moe(x)
        expected = dequantized.model.layers[1].block_sparse_moe(x)
        q = ours(ids)
    expert = ours.model.layers[0].block_sparse_moe.experts[2].w1
    assert type(expert).__name__ == ("Int4Linear" if bits == 4 else "Int8Linear")
    assert ours.model.layers[0].self_attn.q_proj.bias is not None  # biases survive quantization
    assert type(ours.model.layers[0].block_sparse_moe.gate).__name__ == "Router"  # routing stays exact
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 0.03, rel
    save_hf_checkpoint(ours, tmp_path)
    back = load_hf_checkpoint(tmp_path)
    quantize_to_checkpoint(fresh, tmp_path / "streamed", bits=bits, group_size=32)  # `phi3 quantize`'s way
    with torch.no_grad():
        assert torch.equal(back(ids), q)
        assert torch.equal(load_hf_checkpoint(tmp_path / "streamed")(ids), q)


def test_runs_through_phi3_load_and_the_cli(tmp_path, capsys):
    """With the Phi-3 tokenizer (llama.cpp's vocabulary file): phi3.load(dir) and `phi3 generate --model DIR`."""
    import phi3
    from phi3.cli import main
    from phi3.tokenizer import Tokenizer

    from ..conftest import SHARED

    tok = Tokenizer.from_gguf(SHARED / "tokenizer" / "ggml-vocab-phi-3.gguf")
    _, ours = make_pair(vocab_size=32064)
    save_hf_checkpoint(ours, tmp_path, tokenizer=tok)
    lm = phi3.load(tmp_path)
    assert isinstance(lm.model, PhiMoEForCausalLM)
    prompt = lm.encode("The sky is")
    expected = [s[0] for s in generate_tokens(ours, [prompt], SamplingParams(max_new_tokens=5, stop_token_ids=frozenset()))]
    text = lm.generate("The sky is", max_new_tokens=5, stop_token_ids=frozenset())
    assert text.strip() == tok.decode(expected).strip()
    assert main(["generate", "The sky is", "--model", str(tmp_path), "-n", "5", "-t", "0"]) == 0
    assert capsys.readouterr().out.strip() == lm.generate("The sky is", max_new_tokens=5).strip()


# ---- the release preset (phi3/presets/phi-3.5-moe-instruct.json; sources in presets/SOURCES.md) ----------
RELEASE = "phi-3.5-moe-instruct"


def test_release_preset_has_the_spec_numbers():
    cfg = load_preset(RELEASE)
    assert isinstance(cfg, PhiMoEConfig)
    # spec §3.1
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (32064, 4096, 6400, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.router_jitter_noise) == (16, 2, 0.01)
    assert (cfg.max_position_embeddings, cfg.original_max_position_embeddings, cfg.rope_theta) == (131072, 4096, 1e4)
    assert cfg.raw["input_jitter_noise"] == 0.01
    assert cfg.attention_bias and cfg.lm_head_bias and not cfg.tie_word_embeddings
    assert cfg.is_longrope and cfg.short_mscale == cfg.long_mscale == MSCALE
    rs = cfg.raw["rope_scaling"]
    assert rs["type"] == "longrope" and rs["original_max_position_embeddings"] == 4096
    # one factor per rotary pair: head_dim / 2 = 64
    assert len(cfg.rope_scaling["short_factor"]) == len(cfg.rope_scaling["long_factor"]) == cfg.rotary_dim // 2 == 64
    # the first 8 entries as an independent copy has them (tests that load microsoft/Phi-3.5-MoE-instruct)
    assert cfg.rope_scaling["long_factor"][:8] == [1.0199999809265137, 1.0299999713897705, 1.0399999618530273] + \
        [1.0499999523162842] * 3 + [1.059999942779541] * 2
    assert cfg.rope_scaling["short_factor"][:8] == [1.0] + [1.0399999618530273] * 3 + [1.0499999523162842] * 4
    assert cfg.rope_scaling["long_factor"][-1] == 64.95999908447266
    assert cfg.rope_scaling["short_factor"][-1] == 2.7899999618530273
    # spec §3.2 derived parameter counts
    assert abs(cfg.num_parameters() / 1e9 - 41.87) < 0.01 and abs(cfg.active_parameters() / 1e9 - 6.64) < 0.01


def test_release_preset_structure_scaled_down_matches_transformers():
    """The preset's structure (GQA 4:1, biases, LongRoPE with its own mscale, picked factors) at toy size."""
    raw = scaled_down(RELEASE, original=L0, vocab=96)
    raw.update(num_local_experts=4, intermediate_size=64)
    raw["rope_scaling"]["original_max_position_embeddings"] = L0
    assert len(raw["rope_scaling"]["long_factor"]) == 8
    ref = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**raw)).eval()
    hf_rotary_follows_seq_len(ref)
    cfg = config_from_hf_dict(raw)
    assert (cfg.num_attention_heads // cfg.num_key_value_heads, cfg.short_mscale) == (4, MSCALE)
    ours = build_model(cfg, to_original_names(ref.state_dict(), cfg), torch.float32)
    ids = torch.randint(0, 96, (2, 2 * L0 + 3))  # past L0: the long factors
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() < 1e-4
