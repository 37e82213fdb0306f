"""Pretraining task: phases of token budgets over weighted mixtures of token-shard sources.

Batches are random windows of `seq_len + 1` tokens. The global batch of step s is drawn from a
generator seeded by (seed, phase, step): the source of each row by the phase's mixture weights,
then a window of that source uniformly. Rank r reads only its rows (r's contiguous slice of the
global batch), so the data position of a run is just its step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.tokenize import DataError, TokenShards, load_tokenizer
from ..errors import ConfigError
from .config import TrainConfig
from .loop import DistInfo, lm_loss_sum, steps_for_tokens
from .optim import lr_at


class PretrainTask:
    name = "pretrain"

    def __init__(self, cfg: TrainConfig, model, d: DistInfo):
        if not cfg.phases:
            raise ConfigError(f"{cfg.run_dir}: pretraining needs at least one entry in `phases`")
        self.cfg, self.d = cfg, d
        self.rows = cfg.micro_batch_size * cfg.grad_accum  # per rank
        self.global_batch = self.rows * d.world
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        used = {s for ph in cfg.phases for s in ph.mixture} | ({cfg.eval.source} if cfg.eval and cfg.eval.source else set())
        self.sources: dict[str, TokenShards] = {}
        self.cum: dict[str, np.ndarray] = {}
        for name in sorted(used):
            src = TokenShards(cfg.sources[name])
            if vocab is not None and src.vocab_size > vocab:
                raise DataError(f"sources.{name}: {src.path} was tokenized with a vocabulary of {src.vocab_size}, "
                                f"larger than the model's vocab_size {vocab}")
            cum = src.windows(cfg.seq_len + 1)
            if not len(cum) or cum[-1] == 0:
                raise DataError(f"sources.{name}: {src.path} has no document run of {cfg.seq_len + 1} tokens "
                                f"(seq_len + 1); it holds {src.tokens} tokens")
            self.sources[name], self.cum[name] = src, cum
        self.phase_steps = [steps_for_tokens(ph.tokens, self.global_batch, cfg.seq_len) for ph in cfg.phases]
        self.bounds = np.cumsum([0] + self.phase_steps)
        self.total_steps = int(self.bounds[-1])
        self.tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None

    def _phase_index(self, step: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.bounds, step, side="right")) - 1
        return i, step - int(self.bounds[i])

    def phase(self, step: int) -> str:
        return self.cfg.phases[self._phase_index(step)[0]].name

    def lr(self, step: int) -> float:
        i, k = self._phase_index(step)
        ph = self.cfg.phases[i]
        return lr_at(k, self.phase_steps[i], ph.lr or self.cfg.optimizer.lr, ph.schedule)

    def _rows(self, rng: np.random.Generator, names: list[str], weights: np.ndarray, n: int) -> list[tuple[str, int]]:
        """The (source, window) of all n rows of a global batch: drawn for every row on every rank."""
        which = rng.choice(len(names), size=n, p=weights / weights.sum())
        picks = [int(rng.integers(0, int(self.cum[names[j]][-1]))) for j in which]
        return [(names[j], k) for j, k in zip(which, picks)]

    def _batch(self, rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        L = self.cfg.seq_len + 1
        w = np.stack([self.sources[s].window(k, L, self.cum[s]) for s, k in rows])
        t = torch.from_numpy(w).to(self.d.device)
        return {"input_ids": t[:, :-1], "targets": t[:, 1:]}

    def micro_batches(self, step: int) -> list[dict]:
        i, _ = self._phase_index(step)
        mixture = self.cfg.phases[i].mixture
        names = sorted(mixture)
        rng = np.random.default_rng([self.cfg.seed, i, step])
        rows = self._rows(rng, names, np.array([mixture[n] for n in names], dtype=np.float64), self.global_batch)
        mine = rows[self.d.rank * self.rows:(self.d.rank + 1) * self.rows]
        b = self.cfg.micro_batch_size
        return [self._batch(mine[j:j + b]) for j in range(0, self.rows, b)]

    def count(self, mb: dict) -> float:
        return float((mb["targets"] != -100).sum())

    def loss(self, model, mb: dict):
        return lm_loss_sum(model, mb), {}

    def evaluate(self, model) -> dict:
        """Held-out loss on fixed windows of `eval.source` (the same windows at every evaluation)."""
        ev = self.cfg.eval
        if ev is None or ev.source is None:
            return {}
        from .loop import all_reduce_sum

        n = ev.batches * self.cfg.micro_batch_size * self.d.world
        rng = np.random.default_rng([self.cfg.seed, 2**31 - 1])
        rows = self._rows(rng, [ev.source], np.ones(1), n)
        per_rank = n // self.d.world
        mine = rows[self.d.rank * per_rank:(self.d.rank + 1) * per_rank]
        total = torch.zeros(2, dtype=torch.float64, device=self.d.device)
        b = self.cfg.micro_batch_size
        for j in range(0, len(mine), b):
            mb = self._batch(mine[j:j + b])
            total += torch.tensor([float(lm_loss_sum(model, mb)), self.count(mb)], dtype=torch.float64,
                                  device=self.d.device)
        s, c = all_reduce_sum(total, self.d).tolist()
        return {"eval_loss": s / c}
