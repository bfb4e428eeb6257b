"""P6: raypipe's pretraining loop (no Ray) on one GPU: tokens/s and MFU, bf16.

Runs `raypipe.engine.pretrain_loop.pretrain_loop`, the loop every pretrain worker runs, with
raypipe's Transformer and CausalLM objective and its optimizer (fused AdamW, weight decay on
matrices, warmup + cosine), over an in-memory session whose random tokens are already on the
device, so the figure is the loop's own. Needs only PyTorch (run from the repository root; no
Ray, no MLflow):

    python bench/gpu_step.py                       # GPT-124M class: 12 x 768, T=1024
    python bench/gpu_step.py --compile             # the same with torch.compile
    python bench/gpu_step.py --tiny --device cpu   # a smoke run anywhere

Throughput is read from the loop's own `perf/tokens_per_s` over the logged intervals after
the first `--warmup` steps (the loop logs every `--warmup` steps). MFU = tokens/s x (6N +
12·L·d·T) / the device's dense bf16 peak (raypipe/engine/flops.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tempfile  # noqa: E402

import torch  # noqa: E402

from raypipe.config import PretrainConfig  # noqa: E402
from raypipe.engine.flops import mfu, peak_flops, transformer_flops_per_token  # noqa: E402
from raypipe.engine.pretrain_loop import PretrainJob, pretrain_loop  # noqa: E402
from raypipe.engine.session import MemorySession  # noqa: E402
from raypipe.models import build_model  # noqa: E402

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

    logging.getLogger("raypipe").setLevel(logging.ERROR)  # the loop's status lines
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    config = {**(TINY if args.tiny else GPT_124M), "causal": True}
    seq_len = config["max_len"]
    spec = {"type": "transformer", "config": config}
    if args.steps % args.warmup or args.steps <= args.warmup:
        parser.error("--steps must be a multiple of --warmup, and larger")
    cfg = PretrainConfig(
        objective="causal_lm", max_steps=args.steps, batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum, seq_len=seq_len, precision=args.precision,
        compile=args.compile, log_every=args.warmup, checkpoint_every=args.steps,
        optimizer={"lr": 6e-4, "weight_decay": 0.1, "warmup_steps": 10},
    )  # fmt: skip
    per_token = transformer_flops_per_token(build_model(spec), seq_len)
    # Blocks of seq_len + 1 tokens, as the causal LM's data pipeline packs them; enough rows
    # for every step, so no epoch ends inside the timing.
    rows = args.steps * args.grad_accum * args.batch_size
    tokens = torch.randint(0, config["vocab_size"], (rows, seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="raypipe-gpu-step-") as tmp:
        session = MemorySession({"train": {"input_ids": tokens}}, checkpoint_dir=tmp,
                                prefix="step-", device=device, num_to_keep=1)  # fmt: skip
        job = PretrainJob(cfg=cfg, model_spec=spec, tokenizer_json=None, seed=0,
                          fingerprint="gpu-step", checkpoint_dir=tmp)  # fmt: skip
        outcome = pretrain_loop(job, session)
    logged = [m for _, m in session.logger.metrics if "perf/tokens_per_s" in m][1:]
    rate = sum(m["perf/tokens_per_s"] for m in logged) / len(logged)
    step_s = sum(m["perf/step_time_s"] for m in logged) / len(logged)
    timed, loss = args.steps - args.warmup, outcome.final_loss
    params = session.logger.params["num_parameters"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device        {name}; torch {torch.__version__}")
    print(
        f"model         {params / 1e6:.1f}M parameters, {config['num_layers']} x "
        f"{config['dim']}, T={seq_len}; batch {args.batch_size} x {args.grad_accum} accum"
    )
    print(f"precision     {args.precision}; compile {args.compile}")
    print(f"step time     {1e3 * step_s:.1f} ms over {timed} steps (loss {loss:.3f})")
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
