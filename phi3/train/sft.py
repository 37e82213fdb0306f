"""SFT task: chat JSONL rendered with the model's chat template, loss on assistant tokens only,
packed rows without attention across documents, a held-out split, optional LoRA."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .chat_data import (check_messages, encode_chat, example_tensors, pack, pad_id_of, pad_rows, read_jsonl,
                        split, step_indices, task_tokenizer)
from .config import TrainConfig
from .loop import DistInfo, all_reduce_sum, lm_loss_sum
from .optim import lr_at


class SFTTask:
    name = "sft"

    def __init__(self, cfg: TrainConfig, model, d: DistInfo):
        if cfg.sft is None:
            raise ConfigError(f"{cfg.run_dir}: `phi3 train sft` needs an `sft` section")
        self.cfg, self.s, self.d = cfg, cfg.sft, d
        self.tokenizer = task_tokenizer(cfg)
        vocab = model.config.vocab_size if hasattr(model, "config") else None
        if vocab is not None and self.tokenizer.vocab_size > vocab:
            raise ConfigError(f"tokenizer {self.tokenizer.source}: {self.tokenizer.vocab_size} tokens, more than the "
                              f"model's vocab_size {vocab}")
        examples = []
        for lineno, obj in read_jsonl(self.s.data):
            where = f"{self.s.data}:{lineno}"
            ids, mask = encode_chat(self.tokenizer, check_messages(obj.get("messages"), where), where)
            examples.append(example_tensors(ids, mask, cfg.seq_len))
        train_idx, eval_idx = split(len(examples), self.s.eval_fraction, cfg.seed)
        self.pad = pad_id_of(self.tokenizer)
        train_ex, eval_ex = [examples[i] for i in train_idx], [examples[i] for i in eval_idx]
        if self.s.pack:  # rows are packed dicts; otherwise rows are examples, padded per micro-batch
            self.train_rows = pack(train_ex, cfg.seq_len, self.pad)
            self.eval_rows = pack(eval_ex, cfg.seq_len, self.pad) if eval_ex else []
        else:
            self.train_rows, self.eval_rows = train_ex, eval_ex
        self.total_steps = self.s.steps
        self.rows = cfg.micro_batch_size * cfg.grad_accum
        self.global_batch = self.rows * d.world
        if self.s.lora is not None:
            from .lora import apply_lora
            apply_lora(model, self.s.lora)

    def phase(self, step: int) -> str:
        return "sft"

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.s.lr or self.cfg.optimizer.lr, self.s.schedule)

    def _stack(self, rows: list) -> dict:
        mb = {k: torch.stack([r[k] for r in rows]) for k in rows[0]} if self.s.pack else pad_rows(rows, self.pad)
        return {k: v.to(self.d.device) for k, v in mb.items()}

    def micro_batches(self, step: int) -> list[dict]:
        idx = step_indices(step, self.global_batch, len(self.train_rows), self.cfg.seed)
        mine = idx[self.d.rank * self.rows:(self.d.rank + 1) * self.rows]
        b = self.cfg.micro_batch_size
        return [self._stack([self.train_rows[i] for i in mine[j:j + b]]) for j in range(0, self.rows, b)]

    def count(self, mb: dict) -> float:
        return float((mb["targets"] != -100).sum())

    def loss(self, model, mb: dict):
        return lm_loss_sum(model, mb), {}

    def evaluate(self, model) -> dict:
        if not self.eval_rows:
            return {}
        mine = self.eval_rows[self.d.rank::self.d.world]
        total = torch.zeros(2, dtype=torch.float64, device=self.d.device)
        for j in range(0, len(mine), self.cfg.micro_batch_size):
            mb = self._stack(mine[j:j + self.cfg.micro_batch_size])
            total += torch.tensor([float(lm_loss_sum(model, mb)), self.count(mb)], dtype=torch.float64,
                                  device=self.d.device)
        s, c = all_reduce_sum(total, self.d).tolist()
        return {"eval_loss": s / max(c, 1.0)}

    def export_state_dict(self, sd: dict) -> dict:
        if self.s.lora is None:
            return sd
        from .lora import merge_state_dict
        return merge_state_dict(sd, self.s.lora)
