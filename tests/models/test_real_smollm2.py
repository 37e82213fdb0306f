"""Real weights: SmolLM2-135M-Instruct (the embedded default model, a Q4_1/Q8_0 GGUF) against
transformers loading the same GGUF file, plus the CLI on it."""

import subprocess
import sys

import pytest
import torch
import transformers

import phi3
from phi3.checkpoint import load_hf_checkpoint

LOGIT_TOLERANCE = 1e-3  # fp32 on both sides from the same dequantised weights; measured max is ~1e-5
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def ours(default_gguf):
    return phi3.load(default_gguf, dequantize=True)  # the dense model, as transformers builds it


@pytest.fixture(scope="module")
def reference(hf_smollm2):
    return hf_smollm2


def test_logits_match_transformers_on_the_same_gguf(ours, reference):
    model, tok = reference
    text = "The quick brown fox jumps over the lazy dog. In Python, a list comprehension"
    ids = ours.encode(text)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours.model(x) - model(x).logits).abs().max().item()
    assert diff < LOGIT_TOLERANCE, f"max |Δlogit| = {diff}"


def test_greedy_chat_reply_matches_transformers(ours, reference):
    model, tok = reference
    messages = [{"role": "user", "content": QUESTION}]
    prompt = ours.chat_prompt(messages)
    assert prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                         eos_token_id=sorted(ours.tokenizer.stop_token_ids), pad_token_id=2)
    expected = tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
    result = ours.complete_ids([prompt], max_new_tokens=40)[0]
    assert result.text.strip() == expected
    assert "Paris" in result.text and result.finish_reason == "stop"


def test_cli_chat_and_generate_print_just_the_text(default_gguf):
    chat = subprocess.run([sys.executable, "-m", "phi3.cli", "chat", "--model", str(default_gguf), QUESTION],
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout and "<|im_end|>" not in chat.stdout
    gen = subprocess.run([sys.executable, "-m", "phi3.cli", "generate", "The capital of France is", "--model",
                          str(default_gguf), "--max-new-tokens", "8", "--temperature", "0"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith(" ") and len(gen.stdout.strip()) > 0  # a continuation of the prompt


def test_threads_are_settable_on_chat_generate_and_serve(default_gguf, capsys):
    from phi3.cli import main

    before = torch.get_num_threads()
    try:
        assert main(["generate", "Hello", "--model", str(default_gguf), "-n", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and capsys.readouterr().out.strip()
    finally:
        torch.set_num_threads(before)
    for verb in (["chat", "Hi"], ["generate", "Hi"], ["serve"]):
        assert main([*verb, "--threads", "-2"]) == 2
        assert capsys.readouterr().err.strip() == "error: --threads must be >= 0, not -2"


def test_interactive_chat_keeps_history(default_gguf):
    """Lines on stdin are turns of one conversation: the second reply is generated from the whole history."""
    ours = phi3.load(default_gguf)  # as the CLI loads it: int4 weights kept
    first, second = "My name is Ada.", "What is my name?"
    run = subprocess.run([sys.executable, "-m", "phi3.cli", "chat", "--model", str(default_gguf), "-n", "30"],
                         input=f"{first}\n{second}\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    reply1 = ours.chat([{"role": "user", "content": first}], max_new_tokens=30)
    reply2 = ours.chat([{"role": "user", "content": first}, {"role": "assistant", "content": reply1},
                        {"role": "user", "content": second}], max_new_tokens=30)
    assert reply2 != ours.chat(second, max_new_tokens=30)  # the history changes the answer
    assert run.stdout == f"{reply1}\n{reply2}\n"


def _interactive_chat(default_gguf, lines, monkeypatch, capsys, context=None, max_new=30):
    """`phi3 chat` in this process with `lines` on stdin: (stdout, stderr, prefill lengths per turn)."""
    import dataclasses
    import io

    import phi3.generate as gen
    from phi3 import cli

    lm = phi3.load(default_gguf)
    if context is not None:
        lm.model.config = dataclasses.replace(lm.model.config, max_position_embeddings=context)
    prefills = []
    real = gen.prefill
    monkeypatch.setattr(gen, "prefill", lambda model, ids, *a, **k: prefills.append(ids.shape[1]) or real(model, ids, *a, **k))
    monkeypatch.setattr(cli, "_load", lambda args: lm)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    assert cli.main(["chat", "-n", str(max_new)]) == 0
    out = capsys.readouterr()
    return out.out, out.err, prefills, lm


def test_interactive_chat_prefills_only_each_new_turn(default_gguf, monkeypatch, capsys):
    """The conversation's KV cache stays between turns: turn 2 prefills the end of reply 1 and the new
    message, not the history; the replies are those of a fresh run on the whole history."""
    first, second = "My name is Ada.", "What is my name?"
    out, _, prefills, lm = _interactive_chat(default_gguf, [first, second], monkeypatch, capsys)
    reply1, reply2 = out.splitlines()
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": reply1},
               {"role": "user", "content": second}]
    assert reply2 == lm.chat(history, max_new_tokens=30)
    whole = len(lm.chat_prompt(history))
    assert prefills[0] == len(lm.chat_prompt(first)) and prefills[1] < whole - len(lm.chat_prompt(first))
    assert prefills[1] < 20 < whole


def test_interactive_chat_drops_the_oldest_turns_to_fit_the_context(default_gguf, monkeypatch, capsys):
    """Past the context the oldest turns go (a note on stderr says so) and the chat goes on; a message
    longer than the whole context is refused with the reason, and the next one is answered."""
    long_line = "Tell me about the history of the city of Paris and its river. " * 3
    lines = [long_line] * 4 + ["word " * 300, "What did I ask about?"]
    out, err, _, lm = _interactive_chat(default_gguf, lines, monkeypatch, capsys, context=256, max_new=30)
    notes = err.splitlines()
    assert "(the oldest 2 messages were dropped to fit the model's 256-token context)" in notes
    assert notes[-1].startswith("error: prompt has") and notes[-1].endswith("the model's context is 256 tokens")
    replies = out.splitlines()
    assert len(replies) == 5 and replies[-1].strip()  # the last message answered
    # the refused message left the history as it was: the last reply comes from the newest turns that
    # fit with 30 tokens to spare, then the question
    turns = [[{"role": "user", "content": long_line}, {"role": "assistant", "content": r}] for r in replies[:4]]
    question = [{"role": "user", "content": lines[-1]}]
    history = next(h for k in range(4, -1, -1) for h in [sum(turns[4 - k:], []) + question]
                   if len(lm.chat_prompt(h)) + 30 <= 256)
    assert len(history) > 1 and replies[-1] == lm.chat(history, max_new_tokens=30)


def test_ctrl_c_stops_a_reply_not_the_chat(default_gguf, monkeypatch, capsys):
    """Ctrl-C while a reply streams ends that reply (what was printed stays in the history) and the
    chat goes on with the next message, from a prompt cache that is still sound."""
    import io

    from phi3 import cli

    lm = phi3.load(default_gguf)
    real, histories = lm.chat_stream, []

    def chat_stream(history, **kw):
        histories.append([dict(m) for m in history])
        pieces = real(history, **kw)
        if len(histories) == 1:  # the first reply: two pieces, then Ctrl-C
            yield next(pieces)
            yield next(pieces)
            raise KeyboardInterrupt
        yield from pieces

    monkeypatch.setattr(lm, "chat_stream", chat_stream)
    monkeypatch.setattr(cli, "_load", lambda args: lm)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a long story.\nWhat is the capital of France?\n"))
    assert cli.main(["chat", "-n", "30"]) == 0
    out, err = capsys.readouterr()
    partial, answer = out.splitlines()
    assert "(stopped)" in err and partial
    assert histories[1][1] == {"role": "assistant", "content": partial}
    assert answer == lm.chat(histories[1], max_new_tokens=30)


def test_file_prompts_for_generate_and_chat(default_gguf, tmp_path, monkeypatch, capsys):
    """`--file`: a document as the prompt (generate) or as the message before MESSAGE (chat); '-' reads
    standard input; an unreadable file or no prompt at all is a one-line error."""
    import io

    from phi3 import cli

    lm = phi3.load(default_gguf)
    monkeypatch.setattr(cli, "_load", lambda args: lm)
    doc = tmp_path / "doc.txt"
    doc.write_text("Paris is the capital of France. It lies on the Seine.\n", encoding="utf-8")
    assert cli.main(["generate", "--file", str(doc), "-n", "8"]) == 0
    assert capsys.readouterr().out == lm.generate(doc.read_text(), max_new_tokens=8) + "\n"
    assert cli.main(["chat", "-f", str(doc), "Which river?", "-n", "20"]) == 0
    message = "Paris is the capital of France. It lies on the Seine.\n\nWhich river?"
    assert capsys.readouterr().out == lm.chat(message, max_new_tokens=20) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(doc.read_text()))
    assert cli.main(["chat", "-f", "-", "Which river?", "-n", "20"]) == 0
    assert capsys.readouterr().out == lm.chat(message, max_new_tokens=20) + "\n"
    assert cli.main(["generate", "-f", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot read --file {tmp_path / 'missing.txt'}: No such file or directory"
    assert cli.main(["generate"]) == 2
    assert "nothing to complete" in capsys.readouterr().err


def test_fit_history_keeps_the_system_message_and_the_newest_turn():
    from types import SimpleNamespace

    from phi3.cli import fit_history

    lm = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=50),
                         chat_prompt=lambda h: [0] * sum(len(m["content"].split()) + 2 for m in h))
    msg = lambda role, n: {"role": role, "content": "w " * n}  # noqa: E731
    history = [msg("system", 3), msg("user", 10), msg("assistant", 10), msg("user", 10), msg("assistant", 10),
               msg("user", 5)]
    assert fit_history(lm, history, reserve=20) == 4  # 5 + 12·4 + 7 tokens, 30 allowed: two turns go
    assert [m["role"] for m in history] == ["system", "user"]
    history = [msg("user", 30)]
    assert fit_history(lm, history, reserve=20) == 0 and len(history) == 1  # the newest message always stays
    history = [msg("user", 10), msg("assistant", 10), msg("user", 60)]
    assert fit_history(lm, history, reserve=20) == 0 and len(history) == 3  # too long alone: nothing dropped


def test_convert_gguf_to_hf_loads_in_transformers(default_gguf, ours, tmp_path):
    run = subprocess.run([sys.executable, "-m", "phi3.cli", "convert", str(default_gguf), str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = ours.encode("Hello world, this is a test.")
    assert tok("Hello world, this is a test.", add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(theirs(x).logits, ours.model(x))
        assert torch.equal(load_hf_checkpoint(tmp_path / "hf")(x), ours.model(x))
    info = subprocess.run([sys.executable, "-m", "phi3.cli", "info", str(default_gguf)], capture_output=True, text=True)
    assert "LlamaForCausalLM" in info.stdout and "0.135 B" in info.stdout
    assert "kv cache:     23.0 KB per token" in info.stdout  # 30 layers x 2 x 3 KV heads x 64 x 2 bytes
