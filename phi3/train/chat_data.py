"""Chat data for SFT and DPO: JSONL reading, template rendering with assistant-token labels,
packing into fixed-length rows, and the deterministic split / batch order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.tokenize import DataError, load_tokenizer
from ..errors import ConfigError

IGNORE = -100


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        out.append((lineno, obj))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string `role` and `content`")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{i}].role {m['role']!r} is not system, user or assistant")
    return messages


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encode_chat(tok, messages: list[dict], where: str = "conversation") -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant
    turn (its content and the template's end-of-turn tokens). The whole text is tokenized once
    (as inference sees it); assistant spans are located by rendering each turn's prefix."""
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render turn {i}'s prompt as a prefix "
                            "of the conversation; cannot locate the assistant tokens")
        upto = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        spans.append((len(prompt), _common_prefix(upto, full) if i < len(messages) - 1 else len(full)))
    if not spans:
        raise DataError(f"{where}: no assistant message to train on")
    enc = tok.backend.encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    return ids, mask


def example_tensors(ids: list[int], mask: list[bool], seq_len: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example, truncated to seq_len; targets -100 outside assistant turns."""
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    inputs = ids[:-1]
    targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return inputs, targets


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Greedy first-fit packing into rows of seq_len; positions restart per document and segment
    ids keep documents from attending to each other; padding has position -1 and no target."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex[0])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(ex)
                room[r] -= n
                break
        else:
            rows.append([ex])
            room.append(seq_len - n)
    out = []
    for row in rows:
        ids, tgt, pos, seg = [], [], [], []
        for s, (x, y) in enumerate(row):
            ids += x
            tgt += y
            pos += list(range(len(x)))
            seg += [s] * len(x)
        pad = seq_len - len(ids)
        out.append({"input_ids": torch.tensor(ids + [pad_id] * pad), "targets": torch.tensor(tgt + [IGNORE] * pad),
                    "positions": torch.tensor(pos + [-1] * pad), "segment_ids": torch.tensor(seg + [-1] * pad)})
    return out


def pad_rows(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest (padding: position -1, no target)."""
    width = max(len(x) for x, _ in examples)
    ids, tgt, pos = [], [], []
    for x, y in examples:
        pad = width - len(x)
        ids.append(x + [pad_id] * pad)
        tgt.append(y + [IGNORE] * pad)
        pos.append(list(range(len(x))) + [-1] * pad)
    return {"input_ids": torch.tensor(ids), "targets": torch.tensor(tgt), "positions": torch.tensor(pos)}


def split(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed shuffle of range(n) -> (train indices, eval indices)."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n > 1:
        n_eval = max(1, n_eval)
    return perm[n_eval:], perm[:n_eval]


def step_indices(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Items of step `step`'s global batch: consecutive slices of a per-epoch permutation."""
    out = []
    for g in range(step * global_batch, (step + 1) * global_batch):
        epoch, k = divmod(g, n)
        out.append(int(np.random.default_rng([seed, 11, epoch]).permutation(n)[k]))
    return out


def task_tokenizer(cfg):
    """The tokenizer of an SFT / DPO run: `tokenizer`, else the checkpoint's in model.init_from."""
    spec = cfg.tokenizer or cfg.model.init_from
    if spec is None:
        raise ConfigError(f"{cfg.run_dir}: SFT/DPO need a tokenizer (set `tokenizer`, or model.init_from)")
    return load_tokenizer(spec)


def pad_id_of(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return t
    return 0
