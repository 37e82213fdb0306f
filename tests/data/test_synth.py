import pytest

from phi3.data.synth import SynthConfig, dedup_outputs, distinct_ngrams, make_prompts
from phi3.errors import Phi3Error

TEMPLATE = "Write a {style} about {topic} for {audience}.\n{extract}"
SEEDS = [{"id": f"d{i}", "text": f"Title {i}\n" + " ".join(f"w{i}_{j}" for j in range(300))} for i in range(6)]


def test_prompts_cover_distinct_combinations_each_with_its_own_extract():
    cfg = SynthConfig(topics=["heaps", "sorting"], audiences=["kids", "experts"], styles=["story", "lecture"])
    prompts = make_prompts(SEEDS, cfg, n=8, seed=0, template=TEMPLATE)
    assert len({(p["topic"], p["audience"], p["style"]) for p in prompts}) == 8  # all 2x2x2 combinations
    assert len({p["seed_id"] for p in prompts}) == 6  # extracts rotate over the seed documents
    for p in prompts:
        seed = next(s for s in SEEDS if s["id"] == p["seed_id"])
        extract = p["prompt"].split("\n", 1)[1]
        assert extract and extract in seed["text"]
    assert prompts == make_prompts(SEEDS, cfg, n=8, seed=0, template=TEMPLATE)
    assert prompts != make_prompts(SEEDS, cfg, n=8, seed=1, template=TEMPLATE)


def test_topics_default_to_seed_titles():
    prompts = make_prompts(SEEDS, SynthConfig(), n=10, seed=0, template=TEMPLATE)
    assert all(p["topic"].startswith("Title ") for p in prompts)
    with pytest.raises(Phi3Error, match="no seed documents"):
        make_prompts([], SynthConfig(), n=1, seed=0, template=TEMPLATE)


def test_distinct_ngrams():
    assert distinct_ngrams(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)
    assert distinct_ngrams(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert distinct_ngrams([], 2) == 0.0


def test_outputs_are_deduplicated():
    base = " ".join(f"word{i}" for i in range(200))
    items = [{"id": "a", "text": base}, {"id": "b", "text": base.upper()},
             {"id": "c", "text": base.replace("word7 ", "other ")}, {"id": "d", "text": "something else " * 30}]
    kept, reasons = dedup_outputs(items, 0.7)
    assert [k["id"] for k in kept] == ["a", "d"]
    assert reasons == {"exact_duplicate": 1, "near_duplicate": 1}
