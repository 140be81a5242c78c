"""Local-training throughput: hlora's federated client against a plain PEFT loop, same batches, one process.

Both train the packaged all-MiniLM-L6-v2 with LoRA (rank 8, query and value) on the same MRPC rows
in the same order; the plain loop is what a user would write by hand with `peft`. The two are
interleaved over several repeats (A B A B ...) so that machine noise hits both alike, and the ratio of
medians is printed. The federated wrapper's work is loading the client's adapter into its rank slot,
a fresh optimizer, and reading the trained adapter back out.

    python benchmarks/client_overhead.py [--rows 256] [--repeats 5] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402

from hlora.client.trainer import LocalTrainer, batches, make_optimizer  # noqa: E402
from hlora.config import DEFAULT_MODEL, LoraSettings, ModelSettings, TrainSettings  # noqa: E402
from hlora.data.glue import load_split  # noqa: E402
from hlora.data.tokenize import encode, make_collator  # noqa: E402
from hlora.models.lora_model import LoraModel, load_base_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)

    train_settings = TrainSettings(lr=1e-3, batch_size=args.batch_size, local_epochs=1.0)
    lora = LoraSettings(rank=8)
    base, tokenizer = load_base_model(ModelSettings(name_or_path=DEFAULT_MODEL), num_labels=2, seed=0)
    data = encode(load_split("mrpc", "train").head(args.rows), tokenizer, max_length=128)
    collate = make_collator(tokenizer)
    steps = -(-len(data) // args.batch_size)

    # hlora's client: base model shared, adapter loaded into the rank slot, read back afterwards.
    hl_model = LoraModel(base, lora, device)
    start = hl_model.initial_weights(lora.rank, seed=0)
    trainer = LocalTrainer(hl_model, train_settings, collate, progress=False)

    # The plain PEFT loop a user would write, on a second copy of the same base model.
    plain_base, _ = load_base_model(ModelSettings(name_or_path=DEFAULT_MODEL), num_labels=2, seed=0)
    plain = get_peft_model(
        plain_base,
        LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"]),
    ).to(device)

    def run_plain() -> float:
        t0 = time.perf_counter()
        params = [p for p in plain.parameters() if p.requires_grad]
        opt = make_optimizer(params, train_settings)
        plain.train()
        for batch in batches(data, args.batch_size, steps, seed=0, collate=collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            plain(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def run_hlora() -> float:
        t0 = time.perf_counter()
        trainer.train(start, data, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run_plain(), run_hlora()  # warm-up
    plain_s, hlora_s = [], []
    for _ in range(args.repeats):
        plain_s.append(run_plain())
        hlora_s.append(run_hlora())
    samples = steps * args.batch_size
    p, h = statistics.median(plain_s), statistics.median(hlora_s)
    threads = torch.get_num_threads()
    print(f"device {device}, torch threads {threads}, {samples} samples x {args.repeats} repeats")
    print(f"plain PEFT loop : {samples / p:8.1f} samples/s (median {p:.3f} s)")
    print(f"hlora client    : {samples / h:8.1f} samples/s (median {h:.3f} s)")
    print(f"overhead        : {100 * (h / p - 1):+.1f}%  (hlora time / plain time = {h / p:.3f})")


if __name__ == "__main__":
    main()
