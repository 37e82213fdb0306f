"""`phi3 <verb>`: chat, generate, convert, info, fetch, serve — thin wrappers over the Python API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import Phi3Error


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="HF model directory, .gguf file or Hugging Face Hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: fp32 below 2B parameters)")
    p.add_argument("--dequantize", action="store_true",
                   help="load a quantized GGUF in full precision (default: keep its int4/int8 weights)")
    p.add_argument("--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize a full-precision model as it loads: int4 or int8 linears, int8 head "
                        "(as `phi3 quantize` would, without writing a file)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size for --quantize (32, 64 or 128)")
    p.add_argument("--threads", type=int, default=0,
                   help="compute threads (default 0: torch's choice, all cores; fewer is better on a busy machine)")


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop_strings=tuple(args.stop))


def _load(args):
    from .api import load
    if args.threads < 0:
        raise Phi3Error(f"--threads must be >= 0, not {args.threads}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return load(args.model, None if args.dtype == "auto" else args.dtype, dequantize=args.dequantize,
                quantize=args.quantize, group_size=args.group_size)


def _print_stream(chunks, interruptible: bool = False) -> str:
    """Print the streamed text; return it. `interruptible`: Ctrl-C ends the stream (what was printed
    is returned), not the program."""
    parts = []
    try:
        for text in chunks:
            sys.stdout.write(text)
            sys.stdout.flush()
            parts.append(text)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        print("\n(stopped)", file=sys.stderr, end="")
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # the generator's state (its prompt cache) settles now
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def fit_history(lm, history: list[dict], reserve: int) -> int:
    """Drop the oldest turns of `history` in place (a system message stays) until its chat prompt
    leaves `reserve` tokens of the model's context for the reply, or only the newest message is left;
    return how many messages were dropped. Nothing goes when the newest message does not fit even
    alone (the generator then says so)."""
    context = lm.config.max_position_embeddings
    first = 1 if history and history[0]["role"] == "system" else 0
    if len(lm.chat_prompt(history[:first] + history[-1:])) >= context:
        return 0
    dropped = 0
    while len(history) - first > 1 and len(lm.chat_prompt(history)) + reserve > context:
        n = 2 if len(history) - first > 2 else 1  # a user message and the reply to it
        del history[first:first + n]
        dropped += n
    return dropped


def _read_text(path: str) -> str:
    """The text of a --file argument ('-': standard input)."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Phi3Error(f"cannot read --file {path}: {e.strerror if isinstance(e, OSError) else e}") from None


def _with_file(args, text: str) -> str:
    """`text` after the --file contents (a document, then the request about it), as one message."""
    if args.file is None:
        return text
    document = _read_text(args.file)
    return f"{document.rstrip()}\n\n{text}" if text else document


def cmd_chat(args) -> int:
    from .generate import PromptCache

    lm = _load(args)
    sampling = _sampling(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.message or args.file is not None:
        history.append({"role": "user", "content": _with_file(args, " ".join(args.message))})
        _print_stream(lm.chat_stream(history, **sampling))
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"phi3 chat — {Path(lm.source).name}. Ctrl-C stops a reply, /reset clears the history, "
              "/exit or Ctrl-D quits.", file=sys.stderr)
    context = lm.config.max_position_embeddings
    reserve = min(args.max_new_tokens, context // 2)  # room kept for a reply
    prompt_cache = PromptCache()  # the conversation's KV cache: each turn prefills only what is new
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        dropped = fit_history(lm, history, reserve)
        if dropped:
            print(f"(the oldest {dropped} messages were dropped to fit the model's {context}-token context)",
                  file=sys.stderr)
        try:
            reply = _print_stream(lm.chat_stream(history, prompt_cache=prompt_cache, **sampling), interruptible=True)
        except Phi3Error as e:  # e.g. one message longer than the context: say so, keep chatting
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_generate(args) -> int:
    if args.prompt is None and args.file is None:
        raise Phi3Error("nothing to complete: give PROMPT, or --file FILE ('-': standard input)")
    prompt = _with_file(args, args.prompt or "")
    lm = _load(args)
    _print_stream(lm.stream(prompt, **_sampling(args)))
    return 0


def _gguf_without_weights(f):
    """The model of a GGUF file built on the meta device (shapes and config, no weights) and its
    tokenizer: all `phi3 convert` needs when every tensor of the output is taken from the file."""
    import torch

    from .checkpoint import model_class
    from .config import config_from_hf_dict
    from .gguf import gguf_to_hf_config
    from .tokenizer import Tokenizer

    cfg = config_from_hf_dict(gguf_to_hf_config(f))
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    return model, Tokenizer.from_gguf_metadata(f.metadata, source=str(f.path))


def cmd_convert(args) -> int:
    from .api import convert_gguf_to_hf, is_gguf_file, load, resolve, tokenizer_for_dir
    from .checkpoint import convert_hf_checkpoint, save_hf_checkpoint
    from .config import read_config_file
    from .gguf import read_gguf
    from .gguf_export import all_from_source

    dst = Path(args.dst)
    if dst.suffix == ".gguf":
        from .gguf_export import write_gguf
        if dst.is_dir():
            raise Phi3Error(f"{dst}: is a directory, expected a .gguf file path")
        # an HF checkpoint in its own dtype (bf16 stays memory-mapped and is encoded a tensor at a time:
        # fp32 would hold 15 GB for phi-3-mini); a GGUF as it loads (compact), its tensors then written
        # from the file itself: the same blocks where the type stays, else dequantized exactly one at a time
        src = resolve(args.src)
        source = read_gguf(src) if src.is_file() and is_gguf_file(src) else None
        model, tokenizer = _gguf_without_weights(source) if source is not None else (None, None)
        if model is None or not all_from_source(model, source):
            lm = load(src, dequantize=source is None)
            model, tokenizer = lm.model, lm.tokenizer
        write_gguf(model, tokenizer, dst, args.type, name=Path(args.src).stem, progress=True, source=source)
        print(f"wrote GGUF {dst} ({args.type}, {dst.stat().st_size / 1e6:.1f} MB)")
        return 0
    if dst.exists() and not dst.is_dir():
        raise Phi3Error(f"{dst}: exists and is not a directory")
    src, dtype = resolve(args.src), None if args.dtype == "auto" else args.dtype
    source_cfg = read_config_file(src / "config.json") if src.is_dir() else None
    if src.is_file() and is_gguf_file(src):  # a tensor at a time from the file, no model in memory
        convert_gguf_to_hf(src, dst, dtype)
    elif source_cfg is not None and not source_cfg.raw.get("quantization"):  # a tensor at a time, cast as written
        convert_hf_checkpoint(src, dst, dtype, tokenizer_for_dir(src, source_cfg))
    else:  # a quantized checkpoint, dequantized
        lm = load(src, dtype, dequantize=True)
        save_hf_checkpoint(lm.model, dst, tokenizer=lm.tokenizer, dtype=dtype)
    cfg = read_config_file(dst / "config.json")
    print(f"wrote HF checkpoint {dst} ({cfg.layout} layout, {cfg.num_parameters() / 1e6:.1f}M parameters)")
    return 0


def cmd_quantize(args) -> int:
    from .api import load
    from .checkpoint import quantize_to_checkpoint

    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        raise Phi3Error(f"{dst}: exists and is not a directory")
    # the checkpoint's dtype (bf16 stays memory-mapped), a GGUF's blocks as they load: each module is
    # (re)quantized from its own full-precision or dequantized weight as it is written
    lm = load(args.src)
    head_bits = None if args.head_bits == "none" else int(args.head_bits)
    embedding_bits = args.embedding_bits if args.embedding_bits == "head" else \
        None if args.embedding_bits == "none" else int(args.embedding_bits)
    quantize_to_checkpoint(lm.model, dst, bits=args.bits, group_size=args.group_size, head_bits=head_bits,
                           embedding_bits=embedding_bits, tokenizer=lm.tokenizer, dtype=args.dtype)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"wrote int{args.bits} checkpoint {dst} ({size / 1e6:.1f} MB)")
    return 0


def cmd_info(args) -> int:
    from .info import describe
    print(describe(args.model))
    return 0


def cmd_fetch(args) -> int:
    from .default_model import default_model_path
    print(default_model_path())
    return 0


def cmd_serve(args) -> int:
    import os

    from .serve.server import API_KEY_ENV, serve

    for name in ("port", "slots", "ctx", "max_queue"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise Phi3Error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'port' else '>= 1'}")
    lm = _load(args)
    return serve(lm, host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                 slots=args.slots, slot_len=args.ctx, max_queue=args.max_queue, cors_origins=args.cors_origin,
                 model_id=args.served_model_name, log_level=args.log_level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3", description="The Phi-3 model family: chat, generate, convert, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat with a model (interactive without MESSAGE)")
    _add_model(p)
    _add_sampling(p, temperature=0.0)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--file", "-f", default=None,
                   help="a document for one message: its text, then MESSAGE if given ('-': standard input)")
    p.add_argument("message", nargs="*", help="one message: print just the reply")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="plain completion of PROMPT (no chat template)")
    _add_model(p)
    _add_sampling(p, temperature=0.0)
    p.add_argument("--file", "-f", default=None, help="the prompt's text from a file, then PROMPT if given ('-': standard input)")
    p.add_argument("prompt", nargs="?", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert SRC (GGUF or HF directory) to an HF directory DST, "
                                       "or to a GGUF file when DST ends in .gguf")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                   help="tensor type of a GGUF output (q4_0 / q4_1 keep the embedding and head at q8_0; a quantized "
                        "model's groups of 32 that the type holds are written unchanged)")
    p.add_argument("--dtype", default="auto", help="weights dtype of the output (auto keeps the loaded dtype)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of SRC into an HF-layout directory DST")
    p.add_argument("src", help="HF directory, .gguf file or Hub id; a quantized one (GGUF, int4/int8 checkpoint) is "
                               "requantized module by module from the values it loads with")
    p.add_argument("dst")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64, 128 or 256")
    p.add_argument("--head-bits", default="8", choices=["4", "8", "none"],
                   help="bits of the output head (default 8: the head is the layer most hurt by 4 bits)")
    p.add_argument("--embedding-bits", default="head", choices=["head", "4", "8", "none"],
                   help="the embedding table in int8 (a scale per row), int4 (groups of --group-size) or kept in "
                        "--dtype (none); default: the head's bits (a table tied to the head: read from it)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the tensors left unquantized (embeddings, norms)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("info", help="architecture, parameters and bytes of a model")
    p.add_argument("model", nargs="?", default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching and a chat page at /")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (or set PHI3_API_KEY)")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (KV slots)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per slot: prompt + reply (capped at the model's context)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--cors-origin", action="append", default=None, help="allow this browser origin (repeatable; default: no CORS)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file name)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("fetch", help="fetch the embedded default model from PyPI and print its path")
    p.set_defaults(func=cmd_fetch)

    from .data.cli import add_data_commands
    from .train.cli import add_parsers as add_train_parsers
    data_verbs = add_data_commands(sub)  # data ingest|dedup|filter|annotate|classify|synth|decontam|mix|run
    add_train_parsers(sub, data_verbs)  # train pretrain|sft|dpo|plot, and data tokenize
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Phi3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
