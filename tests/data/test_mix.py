import json

import pytest

from phi3.data.io import read_records
from phi3.data.mix import build_mixtures, check_spec, draw, load_spec
from phi3.data.mix import load_tokenizer
from phi3.errors import Phi3Error


def test_draw_meets_the_budget_with_whole_documents_and_cycles_small_sources():
    assert draw([10, 10, 10, 10], 26, 1) == ([(0, 0), (1, 0), (2, 0)], 30, False)
    assert draw([10, 10, 10, 10], 25, 1) == ([(0, 0), (1, 0)], 20, False)  # a tie: not taken
    assert draw([100, 10, 10], 25, 1) == ([(1, 0), (2, 0)], 20, False)  # a document overshooting by more is skipped
    assert draw([10, 10], 46, 3) == ([(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)], 50, False)
    taken, tokens, short = draw([10, 10], 100, 2)
    assert tokens == 40 and short


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_phase_mixtures_follow_weights_and_token_budgets(corpus_shards, tmp_path, tok):
    spec_path = tmp_path / "mix.toml"
    spec_path.write_text(f'''
seed = 3
shard_records = 5
[[phase]]
name = "phase1"
tokens = 30000
[[phase.source]]
name = "docs"
path = "{corpus_shards}/[ps]*.jsonl"
weight = 2
[[phase.source]]
name = "code"
path = "{corpus_shards}/code-*.jsonl"
weight = 1
[[phase]]
name = "phase2"
tokens = 12000
[[phase.source]]
name = "fortunes"
path = "{corpus_shards}/fortunes-*.jsonl"
weight = 1
max_epochs = 4
''')
    report = build_mixtures(load_spec(spec_path), tmp_path / "mix")
    m1 = json.loads((tmp_path / "mix" / "phase1" / "manifest.json").read_text())
    rows = [r for name in m1["shards"] for r in read_records(tmp_path / "mix" / "phase1" / name)]
    assert len(rows) == m1["documents"] and all(len(list(read_records(tmp_path / "mix" / "phase1" / n))) <= 5
                                                 for n in m1["shards"])
    by_source = {s["name"]: s for s in m1["sources"]}
    assert by_source["docs"]["target_tokens"] == 20000 and by_source["code"]["target_tokens"] == 10000
    for name, s in by_source.items():
        counted = sum(len(tok.encode(r["text"])) for r in rows if r["source"] == name)
        assert counted == s["tokens"]  # the manifest's counts are the tokenizer's
        largest = max(len(tok.encode(r["text"])) for r in rows if r["source"] == name)
        assert abs(s["tokens"] - s["target_tokens"]) <= largest  # within one document of the share
    assert {r["id"].split("/")[0] for r in rows if r["source"] == "docs"} <= {"pydoc", "sklearn"}
    assert len({r["id"] for r in rows}) == len(rows)
    m2 = json.loads((tmp_path / "mix" / "phase2" / "manifest.json").read_text())
    f = m2["sources"][0]
    assert f["epochs"] > 1 and f["documents"] > f["available_documents"]  # the small source is repeated
    assert report["phases"]["phase2"]["tokens"] == f["tokens"]
    # a finished phase is not rebuilt
    stamp = (tmp_path / "mix" / "phase1" / m1["shards"][0]).stat().st_mtime_ns
    build_mixtures(load_spec(spec_path), tmp_path / "mix")
    assert (tmp_path / "mix" / "phase1" / m1["shards"][0]).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("spec,msg", [
    ({}, "no \\[\\[phase\\]\\] tables"),
    ({"phase": [{"name": "p", "tokens": 0, "source": [{"name": "a", "path": "x"}]}]}, "'tokens' must be a positive"),
    ({"phase": [{"name": "p", "tokens": 5}]}, "no \\[\\[phase.source\\]\\]"),
    ({"phase": [{"name": "p", "tokens": 5, "source": [{"name": "a", "path": "x", "weight": -1}]}]}, "'weight' must be > 0"),
    ({"phase": [{"name": "p", "tokens": 5, "source": [{"path": "x"}]}]}, "needs 'name' and 'path'"),
])
def test_bad_specs_are_named(spec, msg):
    with pytest.raises(Phi3Error, match=msg):
        check_spec(spec, "mix.toml")


def test_bad_toml_is_a_clear_error(tmp_path):
    (tmp_path / "m.toml").write_text("[[phase]\n")
    with pytest.raises(Phi3Error, match="m.toml: invalid TOML"):
        load_spec(tmp_path / "m.toml")
