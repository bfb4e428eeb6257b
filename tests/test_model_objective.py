"""The pure-PyTorch core without Ray: model, objective and task losses, the step, the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from raypipe import registry
from raypipe.engine.optim import build_optimizer, warmup_cosine
from raypipe.engine.step import Meter, NonFiniteLoss, evaluate, train_step
from raypipe.models import build_model
from raypipe.models.transformer import Transformer, TransformerConfig
from raypipe.objectives.lm import CausalLM
from raypipe.tasks import build_task
from raypipe.tasks.classification import Classification, pool_hidden

CPU = torch.device("cpu")


def tiny(causal: bool = True, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, dim=32, num_layers=2, num_heads=4, max_len=24, causal=causal)
    return Transformer(TransformerConfig(**{**cfg, **kw}))


def test_registry_builds_every_registered_kind():
    import tiny

    for name in registry.OBJECTIVES:
        assert isinstance(tiny.build(name), torch.nn.Module)
    model = build_model(
        {
            "type": "transformer",
            "config": {"vocab_size": 20, "dim": 16, "num_layers": 1, "num_heads": 2},
        }
    )
    options = {"classification": {"num_classes": 3}, "regression": {}, "translation": {}}
    tok = '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}'
    for name in registry.TASKS:
        task = build_task(name, model, options[name], tokenizer_json=tok)
        assert isinstance(task, torch.nn.Module)
    assert registry.resolve("objective", "raypipe.objectives.lm:CausalLM") is CausalLM
    with pytest.raises(KeyError, match="did you mean 'causal_lm'"):
        registry.resolve("objective", "causal_lmm")


def test_causal_model_never_looks_ahead():
    model = tiny().eval()
    x = torch.randint(5, 50, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(5, 50, (2, 6))
    h1, h2 = model(x), model(y)
    assert torch.allclose(h1[:, :10], h2[:, :10], atol=1e-5)
    assert not torch.allclose(h1[:, 10:], h2[:, 10:])


@pytest.mark.parametrize("causal", [True, False])
def test_padding_never_changes_real_tokens(causal):
    model = tiny(causal=causal).eval()
    x = torch.randint(5, 50, (2, 12))
    x[:, 8:] = 0
    mask = x != 0
    y = x.clone()
    y[:, 8:] = 7  # different junk in the padded positions, still masked out
    h1, h2 = model(x, padding_mask=mask), model(y, padding_mask=mask)
    assert torch.allclose(h1[:, :8], h2[:, :8], atol=1e-5)


def test_causal_mask_with_padding_equals_plain_causal_on_real_tokens():
    model = tiny().eval()
    x = torch.randint(5, 50, (1, 10))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    h_plain = model(x)
    h_masked = model(padded, padding_mask=padded != 0)
    assert torch.allclose(h_plain, h_masked[:, :10], atol=1e-5)


def test_causal_lm_loss_matches_reference():
    model = tiny()
    objective = CausalLM(model)
    ids = torch.randint(0, 50, (3, 9))
    loss, metrics = objective({"input_ids": ids.to(torch.int32)})
    # Reference: the negative log-probability of every next token, averaged, computed
    # position by position from the model's logits.
    logits = model.lm_logits(model(ids[:, :-1]))
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = [-logp[b, t, ids[b, t + 1]] for b in range(3) for t in range(8)]
    assert abs(loss.item() - torch.stack(nll).mean().item()) < 1e-6
    assert metrics == {}
    assert objective.items_in({"input_ids": ids}) == 3 * 8


def test_classification_loss_and_stats_match_reference():
    backbone = tiny()
    task = Classification(backbone, num_classes=3, pool="mean")
    ids = torch.randint(5, 50, (4, 10))
    ids[0, 6:] = 0
    labels = torch.tensor([0, 2, 1, 2])
    loss, stats = task({"input_ids": ids, "label": labels})
    logits = task.predict(ids).double()
    ref = [-(logits[i] - logits[i].exp().sum().log())[labels[i]] for i in range(4)]
    ref_loss = torch.stack(ref)
    assert abs(loss.item() - ref_loss.mean().item()) < 1e-6
    assert abs(stats["loss_sum"].item() - ref_loss.sum().item()) < 1e-5
    assert stats["count"].item() == 4
    assert stats["correct"].item() == (logits.argmax(-1) == labels).sum().item()
    summary = Classification.summarize(stats)
    assert summary["accuracy"] == stats["correct"].item() / 4


def test_pooling_reference():
    h = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(pool_hidden(h, mask, "mean")[0], h[0, :2].mean(0))
    assert torch.equal(pool_hidden(h, mask, "mean")[1], h[1].mean(0))
    assert torch.equal(pool_hidden(h, mask, "last"), torch.stack([h[0, 1], h[1, 2]]))


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    objective = CausalLM(tiny())
    opt = build_optimizer(objective.parameters(), lr=3e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=40)
    batch = {"input_ids": torch.randint(0, 50, (8, 17))}
    first = None
    for _ in range(40):
        loss, stats = train_step(objective, opt, sched, [batch], grad_clip=1.0, device=CPU)
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first
    assert stats["grad_norm"].item() > 0


class _PoisonOn(torch.nn.Module):
    """A causal LM whose loss turns NaN on batches marked `poison` (as a bad batch would)."""

    def __init__(self):
        super().__init__()
        self.inner = CausalLM(tiny())

    def forward(self, batch):
        loss, stats = self.inner({"input_ids": batch["input_ids"]})
        return (loss * float("nan") if batch.get("poison") else loss), stats


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_nonfinite_step_stops_or_is_skipped_leaving_weights_untouched(grad_clip):
    module = _PoisonOn()
    opt = build_optimizer(module.parameters(), lr=1e-2, weight_decay=0.0)
    sched = warmup_cosine(opt, warmup_steps=0, total_steps=10)
    good = {"input_ids": torch.randint(0, 50, (4, 9))}
    bad = {**good, "poison": True}
    train_step(module, opt, sched, [good], grad_clip=grad_clip, device=CPU)
    before = [p.detach().clone() for p in module.parameters()]
    moments = {k: v.clone() for k, v in opt.state[next(module.parameters())].items()}

    with pytest.raises(NonFiniteLoss, match="loss nan"):
        train_step(module, opt, sched, [bad], grad_clip=grad_clip, device=CPU)
    _, stats = train_step(
        module, opt, sched, [bad], grad_clip=grad_clip, device=CPU, on_nonfinite="skip"
    )
    assert stats["skipped_steps"].item() == 1
    for p, q in zip(module.parameters(), before, strict=True):
        assert torch.equal(p, q)  # no update reached the weights
    for k, v in opt.state[next(module.parameters())].items():
        assert torch.equal(v, moments[k]), k  # nor the optimizer's moments
    loss, stats = train_step(
        module, opt, sched, [good], grad_clip=grad_clip, device=CPU, on_nonfinite="skip"
    )
    assert torch.isfinite(loss) and "skipped_steps" not in stats
    assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_nonfinite_step_is_skipped_on_the_device_without_a_host_check(grad_clip):
    # check_now=False is what CUDA runs: no host sync, the fused AdamW kernel skips the update
    # (found_inf), and the step is reported as a tensor for the caller to read when it logs.
    module = _PoisonOn()
    opt = build_optimizer(module.parameters(), lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"]
    sched = warmup_cosine(opt, warmup_steps=0, total_steps=10)
    good = {"input_ids": torch.randint(0, 50, (4, 9))}
    bad = {**good, "poison": True}
    _, stats = train_step(
        module, opt, sched, [good], grad_clip=grad_clip, device=CPU, check_now=False
    )
    assert stats["skipped_steps"].item() == 0
    before = [p.detach().clone() for p in module.parameters()]
    moments = {k: v.clone() for k, v in opt.state[next(module.parameters())].items()}

    _, stats = train_step(
        module, opt, sched, [bad], grad_clip=grad_clip, device=CPU, check_now=False
    )
    assert stats["skipped_steps"].item() == 1  # "stop" too: the caller stops when it reads this
    for p, q in zip(module.parameters(), before, strict=True):
        assert torch.equal(p, q)  # no update, no weight decay
    for k, v in opt.state[next(module.parameters())].items():
        assert torch.equal(v, moments[k]), k  # moments and step count untouched
    assert opt.found_inf is None  # nothing left behind for a later step()
    _, stats = train_step(
        module, opt, sched, [good], grad_clip=grad_clip, device=CPU, check_now=False
    )
    assert stats["skipped_steps"].item() == 0
    assert all(not torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


def test_gradient_accumulation_equals_one_big_batch():
    batch = torch.randint(0, 50, (8, 11))
    params = []
    for micro in ([batch], [batch[:4], batch[4:]]):
        objective = CausalLM(tiny())
        opt = torch.optim.SGD(objective.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        train_step(
            objective, opt, sched, [{"input_ids": m} for m in micro], grad_clip=None, device=CPU
        )
        params.append(torch.cat([p.detach().flatten() for p in objective.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_evaluate_sums_stats_and_restores_mode():
    task = Classification(tiny(), num_classes=2)
    task.train()
    ids = torch.randint(5, 50, (6, 8))
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    batches = [
        {"input_ids": ids[:4], "label": labels[:4]},
        {"input_ids": ids[4:], "label": labels[4:]},
    ]
    totals = evaluate(task, batches, device=CPU)
    assert task.training
    task.eval()
    _, whole = task({"input_ids": ids, "label": labels})
    assert totals["count"].item() == 6
    assert abs(totals["loss_sum"].item() - whole["loss_sum"].item()) < 1e-4


def test_optimizer_decays_matrices_only():
    model = tiny()
    opt = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_backbone_may_learn_slower_than_the_head():
    """finetune.optimizer.backbone_lr_ratio: the backbone's groups at ratio x lr through the
    whole schedule, the head's at lr; each parameter in exactly one group."""
    backbone = tiny()
    head = torch.nn.Linear(32, 2)
    task = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    opt = build_optimizer(task.parameters(), lr=1e-3, weight_decay=0.1,
                          lr_scales=[(backbone.parameters(), 0.1)])  # fmt: skip
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    ids = {id(p) for p in backbone.parameters()}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in task.parameters())
    for _ in range(5):
        opt.step()
        sched.step()
        for g in opt.param_groups:
            in_backbone = {id(p) in ids for p in g["params"]}
            assert len(in_backbone) <= 1
            head_lr = max(x["lr"] for x in opt.param_groups)
            want = 0.1 * head_lr if in_backbone == {True} else head_lr
            assert g["lr"] == pytest.approx(want), (g["lr"], want)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_meter_reports_data_wait_share():
    import time

    def slow_batches():
        time.sleep(0.2)
        yield 1

    meter = Meter()
    meter.timed_next(slow_batches())
    meter.steps, meter.items = 1, 100
    time.sleep(0.2)  # "compute"
    out = meter.read_and_reset()
    assert 0.2 < out["data_wait_share"] < 0.8  # about half the wall time was spent waiting
    assert out["tokens_per_s"] > 0 and meter.items == 0 and meter.steps == 0
