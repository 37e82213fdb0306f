"""Scale-up init: tiling preserves the function exactly; layer mapping copies the right layers;
a pretraining run grown from a small checkpoint starts at the small model's loss."""

from __future__ import annotations

import pytest
import torch

from phi3.checkpoint import save_hf_checkpoint
from phi3.errors import ConfigError
from phi3.models.phi3 import Phi3ForCausalLM
from phi3.train.config import ModelSpec, load_config
from phi3.train.loop import train
from phi3.train.model import model_config
from phi3.train.optim import init_weights
from phi3.train.pretrain import PretrainTask
from phi3.train.scaleup import scale_up

from .helpers import TINY, read_metrics, tiny_config, write_config


def small_model() -> Phi3ForCausalLM:
    model = Phi3ForCausalLM(model_config(ModelSpec(preset="phi-3-mini-4k-instruct", overrides=dict(TINY))))
    init_weights(model, 0.2, generator=torch.Generator().manual_seed(1))
    for name, p in model.named_parameters():  # non-trivial norm weights
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    return model.eval()


def grown(**over):
    return model_config(ModelSpec(preset="phi-3-mini-4k-instruct", overrides=dict(TINY, **over)))


def test_wider_model_computes_the_same_logits():
    small = small_model()
    cfg = grown(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=384)
    big = scale_up(small, cfg).eval()
    assert big.model.layers[0].self_attn.qkv_proj.weight.shape == (8 * 16 + 2 * 4 * 16, 128)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(big(ids), small(ids), rtol=1e-5, atol=1e-5)


def test_deeper_model_copies_layers_by_map():
    small = small_model()
    big = scale_up(small, grown(num_hidden_layers=5), layer_map=[0, 0, 1, 1, 1])
    for i, j in enumerate([0, 0, 1, 1, 1]):
        for (n, a), (_, b) in zip(big.model.layers[i].named_parameters(), small.model.layers[j].named_parameters()):
            assert torch.equal(a, b), n
    default = scale_up(small, grown(num_hidden_layers=4))
    assert torch.equal(default.model.layers[1].mlp.down_proj.weight, small.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(default.model.layers[2].mlp.down_proj.weight, small.model.layers[1].mlp.down_proj.weight)
    with pytest.raises(ConfigError, match="layer_map: needs 5 entries"):
        scale_up(small, grown(num_hidden_layers=5), layer_map=[0, 1])
    with pytest.raises(ConfigError, match="hidden_size 96 is not a multiple"):
        scale_up(small, grown(hidden_size=96, num_attention_heads=6, num_key_value_heads=3))


def test_pretraining_from_a_scaled_up_checkpoint(tmp_path):
    small = small_model()
    save_hf_checkpoint(small, tmp_path / "ckpt")
    wide = {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 256}
    runs = {}
    for name, model in (("small", {"init_from": str(tmp_path / "ckpt")}),
                        ("wide", {"init_from": str(tmp_path / "ckpt"), "overrides": wide, "scale_up": {}})):
        (tmp_path / name).mkdir()
        cfg = tiny_config(tmp_path / name, model=model)
        runs[name] = read_metrics(train(load_config(write_config(tmp_path / name, cfg)), PretrainTask, progress=False))
    # step 1 is the loss before any update: the grown model starts exactly where the small one is
    assert runs["wide"][0]["loss"] == pytest.approx(runs["small"][0]["loss"], rel=1e-5)
    assert runs["wide"][-1]["loss"] < runs["wide"][0]["loss"]
