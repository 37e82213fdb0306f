"""DPO task: JSONL of {"prompt", "chosen", "rejected"}; loss -log σ(β((πc − rc) − (πr − rr))) with
reference log-probabilities from a frozen copy or precomputed once (saved in the run directory)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..data.tokenize import DataError
from ..errors import ConfigError
from .chat_data import (check_messages, encode_chat, example_tensors, pad_id_of, pad_rows, read_jsonl, split,
                        step_indices, task_tokenizer)
from .config import TrainConfig
from .loop import DistInfo, all_reduce_sum, model_kwargs
from .optim import lr_at


def sequence_logps(model, mb: dict) -> torch.Tensor:
    """Sum of log p(target) over the labelled (assistant) tokens of each row: [rows]."""
    logits = model(mb["input_ids"], **model_kwargs(mb)).float()
    targets = mb["targets"]
    mask = targets != -100
    logp = torch.gather(F.log_softmax(logits, -1), -1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1)


class DPOTask:
    name = "dpo"

    def __init__(self, cfg: TrainConfig, model, d: DistInfo):
        if cfg.dpo is None:
            raise ConfigError(f"{cfg.run_dir}: `phi3 train dpo` needs a `dpo` section")
        self.cfg, self.p, self.d = cfg, cfg.dpo, d
        self.tokenizer = task_tokenizer(cfg)
        self.pad = pad_id_of(self.tokenizer)
        self.pairs = []  # (chosen example, rejected example)
        for lineno, obj in read_jsonl(self.p.data):
            where = f"{self.p.data}:{lineno}"
            prompt = obj.get("prompt")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            prompt = check_messages(prompt, f"{where}: prompt")
            pair = []
            for key in ("chosen", "rejected"):
                if not isinstance(obj.get(key), str):
                    raise DataError(f"{where}: expected a string field {key!r}")
                msgs = prompt + [{"role": "assistant", "content": obj[key]}]
                pair.append(example_tensors(*encode_chat(self.tokenizer, msgs, where), cfg.seq_len))
            self.pairs.append(tuple(pair))
        self.train_idx, self.eval_idx = split(len(self.pairs), self.p.eval_fraction, cfg.seed)
        self.total_steps = self.p.steps
        self.rows = cfg.micro_batch_size * cfg.grad_accum  # pairs per rank per step
        self.global_batch = self.rows * d.world
        self.reference = None
        self.ref_logps = None
        if self.p.reference == "frozen":
            self.reference = copy.deepcopy(model).eval().to(d.device)
            for q in self.reference.parameters():
                q.requires_grad_(False)
        else:
            self.ref_logps = self._precomputed(model)

    def _batch(self, items: list[int]) -> dict:
        """Chosen rows then rejected rows of the given pairs, padded; `pair` = item indices."""
        rows = [self.pairs[i][0] for i in items] + [self.pairs[i][1] for i in items]
        mb = {k: v.to(self.d.device) for k, v in pad_rows(rows, self.pad).items()}
        mb["pair"] = torch.tensor(items)
        return mb

    @torch.no_grad()
    def _precomputed(self, model) -> torch.Tensor:
        """Reference log-probs of every chosen / rejected sequence, from the initial model, once."""
        path = Path(self.cfg.run_dir) / "reference_logps.safetensors"
        if path.exists():
            t = load_file(str(path))["logps"]
            if t.shape == (len(self.pairs), 2):
                return t
        model.to(self.d.device).eval()
        out = torch.zeros(len(self.pairs), 2, dtype=torch.float64)
        for j in range(0, len(self.pairs), 8):
            items = list(range(j, min(j + 8, len(self.pairs))))
            lp = sequence_logps(model, self._batch(items)).double().cpu()
            out[items, 0], out[items, 1] = lp[:len(items)], lp[len(items):]
        if self.d.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: save_file({"logps": out}, tmp))
        return out

    def _reference(self, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(mb["pair"])
        if self.reference is not None:
            with torch.no_grad():
                lp = sequence_logps(self.reference, mb).double()
            return lp[:n], lp[n:]
        ref = self.ref_logps[mb["pair"]].to(self.d.device)
        return ref[:, 0], ref[:, 1]

    def phase(self, step: int) -> str:
        return "dpo"

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.p.lr or self.cfg.optimizer.lr, self.p.schedule)

    def micro_batches(self, step: int) -> list[dict]:
        idx = step_indices(step, self.global_batch, len(self.train_idx), self.cfg.seed)
        mine = [int(self.train_idx[i]) for i in idx[self.d.rank * self.rows:(self.d.rank + 1) * self.rows]]
        b = self.cfg.micro_batch_size
        return [self._batch(mine[j:j + b]) for j in range(0, self.rows, b)]

    def count(self, mb: dict) -> float:
        return float(len(mb["pair"]))

    def _terms(self, model, mb: dict):
        n = len(mb["pair"])
        lp = sequence_logps(model, mb)
        rc, rr = self._reference(mb)
        chosen = self.p.beta * (lp[:n].double() - rc)
        rejected = self.p.beta * (lp[n:].double() - rr)
        margin = chosen - rejected
        return -F.logsigmoid(margin).sum(), {"reward_margin": margin.detach().sum(),
                                             "accuracy": (margin > 0).double().sum(),
                                             "chosen_reward": chosen.detach().sum(),
                                             "rejected_reward": rejected.detach().sum()}

    def loss(self, model, mb: dict):
        return self._terms(model, mb)

    def evaluate(self, model) -> dict:
        if not len(self.eval_idx):
            return {}
        mine = [int(i) for i in self.eval_idx[self.d.rank::self.d.world]]
        keys = ["loss", "reward_margin", "accuracy"]
        total = torch.zeros(len(keys) + 1, dtype=torch.float64, device=self.d.device)
        for j in range(0, len(mine), self.cfg.micro_batch_size):
            mb = self._batch(mine[j:j + self.cfg.micro_batch_size])
            loss, extra = self._terms(model, mb)
            total += torch.tensor([float(loss), float(extra["reward_margin"]), float(extra["accuracy"]),
                                   len(mb["pair"])], dtype=torch.float64, device=self.d.device)
        sums = all_reduce_sum(total, self.d).tolist()
        return {f"eval_{k}": v / max(sums[-1], 1.0) for k, v in zip(keys, sums)}
