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
    prediction = "tokens"

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
        """Greedy decoding of every row from its source prompt `ids[:, :start]`."""
        rows = torch.arange(ids.shape[0], device=ids.device)
        cols = torch.arange(ids.shape[1], device=ids.device)

        def next_logits(buf: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            mask = cols[None, : buf.shape[1]] < lengths[:, None]
            return self.backbone.lm_logits(self.backbone(buf, padding_mask=mask)[rows, lengths - 1])

        return greedy_decode(
            next_logits, ids, start, max_len=self.backbone.config.max_len,
            max_new_tokens=self.max_new_tokens, pad_id=self.pad_id,
        )  # fmt: skip

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


@torch.no_grad()
def greedy_decode(
    next_logits, ids: torch.Tensor, start: torch.Tensor, *, max_len: int, max_new_tokens: int,
    pad_id: int,
) -> list[list[int]]:  # fmt: skip
    """Greedy decoding of every row of `ids` from its prompt `ids[:, :start]`;
    `next_logits(buf, lengths)` gives each row's next-token logits (B, vocab) from the
    right-padded `buf` (B, T), whose row i holds `lengths[i]` tokens.

    Batched without a cache: rows grow at their own lengths in one right-padded buffer;
    causal attention keeps each row's prediction independent of what lies beyond it. A row
    ends at <eos> (or <pad>, never a target token), at `max_len` or after `max_new_tokens`.
    """
    ids, start = ids.long(), start.long()
    b, width = ids.shape
    max_len = min(width, max_len)
    rows = torch.arange(b, device=ids.device)
    cols = torch.arange(width, device=ids.device)
    buf = ids.masked_fill(cols[None, :] >= start[:, None], pad_id)
    lengths = start.clone()
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        active = ~done & (lengths < max_len)
        if not bool(active.any()):
            break
        nxt = next_logits(buf[:, : int(lengths.max())], lengths).argmax(-1)
        ended = (nxt == EOS_ID) | (nxt == pad_id)
        buf[rows[active & ~ended], lengths[active & ~ended]] = nxt[active & ~ended]
        done |= active & ended
        lengths += (active & ~ended).long()
    return [
        row[s:n] for row, s, n in zip(buf.tolist(), start.tolist(), lengths.tolist(), strict=True)
    ]
