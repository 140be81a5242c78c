"""What a FLoRA checkpoint costs by round: every stack rewritten each commit, against each written once.

FLoRA keeps each round's stack of client factors (its rank is the round's total client rank) because a
client that missed rounds must be sent every stack it lacks. Written as flat tensors of the method's
`aggregator.safetensors` (the layout before blocks), every commit rewrites every stack so far; written
as blocks (`checkpoint/blocks/`), a commit adds only its round's. Both layouts go through the same
`Checkpoint.write` (a flat tensor is how a method's state was stored, and still is for tensors that
change), side by side in one process, into two folders, round by round.

Stacks have all-MiniLM-L6-v2's 36 adapted shapes (query, key, value, attention output, intermediate and
output dense of 6 layers) at a total rank of 150 a round (the paper regime: 20 clients of mean rank 7.5),
25 MB a stack in float32.

    python benchmarks/checkpoint_blocks.py [--rounds 20] [--stack-rank 150] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hlora.checkpoint import BLOCKS_DIR, CHECKPOINT_DIR, Checkpoint

HIDDEN, INTERMEDIATE, LAYERS = 384, 1536, 6


def stack(rank: int, seed: int) -> dict[str, torch.Tensor]:
    """One round's stack: `<weight>.lora_A` (rank x in) and `.lora_B` (out x rank) per adapted weight."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"query": (HIDDEN, HIDDEN), "key": (HIDDEN, HIDDEN), "value": (HIDDEN, HIDDEN),
              "attention.output.dense": (HIDDEN, HIDDEN), "intermediate.dense": (HIDDEN, INTERMEDIATE),
              "output.dense": (INTERMEDIATE, HIDDEN)}  # fmt: skip
    tensors = {}
    for layer in range(LAYERS):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"encoder.layer.{layer}.{name}"
            tensors[f"{key}.lora_A"] = torch.randn(rank, fan_in, generator=g)
            tensors[f"{key}.lora_B"] = torch.randn(fan_out, rank, generator=g)
    return tensors


def server_state(method_state: dict) -> dict:
    return {"global_weights": {}, "version": method_state["deltas"], "synced": {}, "aggregator": method_state}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--stack-rank", type=int, default=150)
    parser.add_argument(
        "--out", type=Path, default=None, help="where the two run folders go (default: a temp dir)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.out))
    flat_dir, block_dir = root / "flat", root / "blocks"
    flat_dir.mkdir()
    block_dir.mkdir()
    stacks: list[dict[str, torch.Tensor]] = []
    totals = {"flat": 0.0, "blocks": 0.0}
    mb = sum(t.numel() * 4 for t in stack(args.stack_rank, 0).values()) / 1e6
    print(f"stack of rank {args.stack_rank}: {mb:.1f} MB")
    print("| round | flat: checkpoint MB | flat: write s | blocks: checkpoint MB | blocks: write s |")
    print("|---:|---:|---:|---:|---:|")
    try:
        for rnd in range(1, args.rounds + 1):
            stacks.append(stack(args.stack_rank, rnd))
            flat = {"deltas": rnd} | {
                f"deltas.{v}.{k}": t for v, s in enumerate(stacks, 1) for k, t in s.items()
            }
            blocks = {"deltas": rnd} | {f"delta.{v}": s for v, s in enumerate(stacks, 1)}
            row = [str(rnd)]
            for name, folder, state in (("flat", flat_dir, flat), ("blocks", block_dir, blocks)):
                start = time.perf_counter()
                Checkpoint(rnd, server_state(state), {"metrics": []}).write(folder)
                seconds = time.perf_counter() - start
                totals[name] += seconds
                row += [f"{folder_bytes(folder / CHECKPOINT_DIR) / 1e6:.0f}", f"{seconds:.2f}"]
            if rnd in (1, 2, 5) or rnd % 10 == 0 or rnd == args.rounds:
                print("| " + " | ".join(row) + " |")
        assert len(list((block_dir / CHECKPOINT_DIR / BLOCKS_DIR).iterdir())) == args.rounds
        print(
            f"\ntotal write time over {args.rounds} rounds: flat {totals['flat']:.1f} s, blocks "
            f"{totals['blocks']:.1f} s ({totals['flat'] / totals['blocks']:.1f}x)"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
