"""Loading and running a model never imports torch._dynamo or sympy (the torch.compile machinery:
~1.4 s of start-up and ~80 MB resident that inference has no use for). Each case runs in a fresh
process."""

import subprocess
import sys

import pytest
import torch

from phi3.checkpoint import build_model, save_hf_checkpoint
from phi3.config import config_from_hf_dict

from .conftest import scaled_down
from .models import test_phi3small, test_phimoe

RUN = """
import sys
import phi3
from phi3.checkpoint import load_hf_checkpoint
from phi3.generate import SamplingParams, generate_tokens
model = load_hf_checkpoint(sys.argv[1]) if sys.argv[1] != "default" else phi3.load().model
for n in (4, min(300, model.config.max_position_embeddings - 8)):  # a few tokens, then a prompt big enough
    prompt = [1 + i % 50 for i in range(n)]                       # for every prefill kernel (fused RoPE ...)
    steps = list(generate_tokens(model, [prompt], SamplingParams(max_new_tokens=4, temperature=0.0)))
    assert len(steps) == 4, steps
print(sorted({"torch._dynamo", "sympy"} & set(sys.modules)) or "neither")
"""


def _random_model(raw: dict):
    cfg = config_from_hf_dict(raw)
    with torch.device("meta"):
        from phi3.checkpoint import model_class
        shapes = model_class(cfg)(cfg).state_dict()
    sd = {k: torch.randn(v.shape) * 0.1 for k, v in shapes.items()}
    return build_model(cfg, sd, torch.float32)


CONFIGS = {
    "phi-3-mini-128k (LongRoPE)": lambda: scaled_down("phi-3-mini-128k-instruct"),
    "phi-3-small (blocksparse)": test_phi3small.small_config,
    "phi-3.5-moe": test_phimoe.small_config,
}


@pytest.mark.parametrize("family", [*CONFIGS, "default GGUF"])
def test_loading_and_generating_import_neither_dynamo_nor_sympy(family, tmp_path, default_gguf):
    where = "default"
    if family in CONFIGS:
        save_hf_checkpoint(_random_model(CONFIGS[family]()), tmp_path)
        where = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", RUN, where], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "neither"


def test_the_lazy_compile_guard_still_keeps_the_fused_loss_eager():
    """`linear_cross_entropy` is cut out of a compiled graph exactly as `torch.compiler.disable`
    cuts it (one break, the same graphs), not traced into (its chunk loop breaks the graph more),
    and the compiled function gives the eager loss."""
    import torch._dynamo as dynamo

    from phi3.layers import linear_cross_entropy
    h, w = torch.randn(12, 16, requires_grad=True), torch.randn(40, 16)
    targets = torch.randint(0, 40, (12,))

    def shape_of(loss_fn):
        dynamo.reset()
        e = dynamo.explain(lambda a, b, t: loss_fn(a * 2, b, t) + 1)(h / 2, w, targets)
        return e.graph_count, e.graph_break_count, e.op_count

    ours = shape_of(linear_cross_entropy)
    assert ours == shape_of(torch.compiler.disable(linear_cross_entropy.__wrapped__))
    assert ours[1] == 1 and shape_of(linear_cross_entropy.__wrapped__)[1] > 1
    dynamo.reset()
    compiled = torch.compile(lambda a, b, t: linear_cross_entropy(a * 2, b, t) + 1)(h / 2, w, targets)
    torch.testing.assert_close(compiled, linear_cross_entropy(h, w, targets) + 1)
