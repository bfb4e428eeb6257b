"""Translation with the pretrained text model as a decoder-only seq2seq model.

Each pair is one sequence, <bos> source <eos> target <eos>; the loss is the cross-entropy on
target tokens only. Evaluation decodes greedily from the source and scores BLEU with sacrebleu,
from n-gram counts that add up exactly across batches and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU
from tokenizers import Tokenizer
from torch import nn

from raypipe.tasks.base import Task
from raypipe.vocab import EOS_ID


class Translation(Task):
    metrics = ("bleu", "loss")
    data_kind = "pairs"
    model_overrides = {"causal": True}
    needs_tokenizer = True

    def __init__(self, backbone: nn.Module, *, tokenizer_json: str, max_new_tokens: int = 64):
        super().__init__(backbone, input="text")
        if not hasattr(backbone, "lm_logits"):
            raise ValueError(
                f"translation needs a text model with an LM head (model.type: transformer), "
                f"got {type(backbone).__name__}"
            )
        self.max_new_tokens = max_new_tokens
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.pad_id = backbone.config.pad_id

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab) of right-padded token ids."""
        return self.backbone.lm_logits(self.backbone(inputs, padding_mask=inputs != self.pad_id))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"].long()
        start = batch["target_start"].long()
        inputs, targets = ids[:, :-1], ids[:, 1:]
        # Position j predicts token j + 1: count it when that token belongs to the target.
        pos = torch.arange(targets.shape[1], device=ids.device)
        on_target = (pos[None, :] + 1 >= start[:, None]) & (targets != self.pad_id)
        logits = self.predict(inputs).float()
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        weights = on_target.flatten().float()
        loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
        stats = {"loss_sum": (losses.detach() * weights).sum(), "count": weights.sum()}
        if not self.training:
            stats.update(self._bleu_stats(ids, start))
        return loss, stats

    @torch.no_grad()
    def translate(self, ids: torch.Tensor, start: torch.Tensor) -> list[list[int]]:
        """Greedy decoding of every row from its source prompt `ids[:, :start]`.

        Batched without a cache: rows grow at their own lengths in one right-padded buffer;
        causal attention keeps each row's prediction independent of what lies beyond it.
        """
        ids, start = ids.long(), start.long()
        b, width = ids.shape
        max_len = min(width, self.backbone.config.max_len)
        rows = torch.arange(b, device=ids.device)
        cols = torch.arange(width, device=ids.device)
        buf = ids.masked_fill(cols[None, :] >= start[:, None], self.pad_id)
        lengths = start.clone()
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        for _ in range(self.max_new_tokens):
            active = ~done & (lengths < max_len)
            if not bool(active.any()):
                break
            cur = int(lengths.max())
            hidden = self.backbone(buf[:, :cur], padding_mask=cols[None, :cur] < lengths[:, None])
            nxt = self.backbone.lm_logits(hidden[rows, lengths - 1]).argmax(-1)
            buf[rows[active], lengths[active]] = nxt[active]
            done |= active & (nxt == EOS_ID)
            lengths += active.long()
        out = []
        for row, s, n in zip(buf.tolist(), start.tolist(), lengths.tolist(), strict=True):
            out.append([t for t in row[s:n] if t != EOS_ID])
        return out

    def _bleu_stats(self, ids: torch.Tensor, start: torch.Tensor) -> dict[str, torch.Tensor]:
        hyps = [self.tokenizer.decode(h) for h in self.translate(ids, start)]
        refs = []
        for row, s in zip(ids.tolist(), start.tolist(), strict=True):
            target = row[s:]
            refs.append(
                self.tokenizer.decode(
                    target[: target.index(EOS_ID)] if EOS_ID in target else target
                )
            )
        score = BLEU().corpus_score(hyps, [refs])
        dev = ids.device
        return {
            "bleu_correct": torch.tensor(score.counts, dtype=torch.float64, device=dev),
            "bleu_total": torch.tensor(score.totals, dtype=torch.float64, device=dev),
            "bleu_sys_len": torch.tensor(float(score.sys_len), dtype=torch.float64, device=dev),
            "bleu_ref_len": torch.tensor(float(score.ref_len), dtype=torch.float64, device=dev),
        }

    @staticmethod
    def summarize(stats: dict[str, torch.Tensor]) -> dict[str, float]:
        out = {"loss": float(stats["loss_sum"]) / max(float(stats["count"]), 1.0)}
        if "bleu_correct" in stats:
            score = BLEU.compute_bleu(
                [int(round(float(x))) for x in stats["bleu_correct"]],
                [int(round(float(x))) for x in stats["bleu_total"]],
                int(round(float(stats["bleu_sys_len"]))),
                int(round(float(stats["bleu_ref_len"]))),
                smooth_method="exp",  # sacrebleu's default for corpus BLEU
            )
            out["bleu"] = float(score.score)
        return out
