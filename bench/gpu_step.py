"""P6: raypipe's exact training step (no Ray) on one GPU: tokens/s and MFU, bf16.

Runs `raypipe.engine.step.train_step` (the step every pretrain worker runs) with raypipe's
Transformer and CausalLM objective and its optimizer (fused AdamW, weight decay on matrices,
warmup + cosine), on random tokens already on the device, so the figure is the step alone.
Needs only PyTorch (run from the repository root; no Ray, no MLflow):

    python bench/gpu_step.py                       # GPT-124M class: 12 x 768, T=1024
    python bench/gpu_step.py --compile             # the same with torch.compile
    python bench/gpu_step.py --tiny --device cpu   # a smoke run anywhere

MFU = tokens/s x (6N + 12·L·d·T) / the device's dense bf16 peak (raypipe/engine/flops.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from raypipe.engine.flops import mfu, peak_flops, transformer_flops_per_token  # noqa: E402
from raypipe.engine.optim import build_optimizer, warmup_cosine  # noqa: E402
from raypipe.engine.step import train_step  # noqa: E402
from raypipe.models import build_model  # noqa: E402
from raypipe.objectives import build_objective  # noqa: E402

GPT_124M = {"vocab_size": 50304, "dim": 768, "num_layers": 12, "num_heads": 12, "max_len": 1024}
TINY = {"vocab_size": 512, "dim": 64, "num_layers": 2, "num_heads": 4, "max_len": 64}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch (sequences)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a smoke run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    config = {**(TINY if args.tiny else GPT_124M), "causal": True}
    seq_len = config["max_len"]
    objective = build_objective(
        "causal_lm", build_model({"type": "transformer", "config": config})
    ).to(device)
    per_token = transformer_flops_per_token(objective.model, seq_len)
    if args.compile:
        objective.compile()
    optimizer = build_optimizer(objective.parameters(), lr=6e-4, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=10, total_steps=args.steps)
    # Blocks of seq_len + 1 tokens, as the causal LM's data pipeline packs them.
    data = torch.randint(
        0, config["vocab_size"], (args.grad_accum, args.batch_size, seq_len + 1), device=device
    )
    micro = [{"input_ids": data[i]} for i in range(args.grad_accum)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = None
    for step in range(args.steps):
        if step == args.warmup:
            sync()
            started = time.perf_counter()
        loss, _ = train_step(
            objective,
            optimizer,
            scheduler,
            micro,
            grad_clip=1.0,
            device=device,
            precision=args.precision,
        )
    loss = float(loss)  # the only host sync of the timed steps, after the last one
    sync()
    elapsed = time.perf_counter() - started
    timed = args.steps - args.warmup
    tokens = timed * args.grad_accum * args.batch_size * seq_len
    rate = tokens / elapsed
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    params = sum(p.numel() for p in objective.parameters())
    print(f"device        {name}; torch {torch.__version__}")
    print(
        f"model         {params / 1e6:.1f}M parameters, {config['num_layers']} x "
        f"{config['dim']}, T={seq_len}; batch {args.batch_size} x {args.grad_accum} accum"
    )
    print(f"precision     {args.precision}; compile {args.compile}")
    print(f"step time     {1e3 * elapsed / timed:.1f} ms over {timed} steps (loss {loss:.3f})")
    print(f"throughput    {rate:,.0f} tokens/s")
    print(f"flops/token   {per_token / 1e9:.3f} GFLOP (6N + 12·L·d·T)")
    if peak:
        print(
            f"MFU           {100 * mfu(rate, per_token, peak):.1f} % of {peak / 1e12:.0f} TFLOP/s"
        )
    else:
        print("MFU           peak unknown for this device (pass --peak-tflops)")
    if device.type == "cuda":
        print(f"peak memory   {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
