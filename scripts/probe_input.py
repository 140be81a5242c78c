"""Does a model still see its input, and which layer's LoRA update took it away? For an exported adapter
(`hlora export RUN OUT`) on a labelled GLUE split:

- `[CLS] spread` by layer: the standard deviation over the rows of the first token's hidden state, mean
  over its dimensions, from the embeddings to the last layer (what the pooler and the classifier read);
- the logits' spread over the rows (`hlora eval`'s second line) and the accuracy, as exported, without
  one layer's LoRA update at a time (its `lora_B` zeroed), and without any.

A global model that fell into the majority class answers every row alike (logit spread ~0); the spread
by layer says where the input stops reaching `[CLS]`, the ablations which updates are needed for that.
Used for BENCHMARKS.md's paper-regime seed 1 (HLoRA):

    .venv/bin/hlora export results/mrpc-paper-a5/runs/hlora-s1 /tmp/hlora-s1   # from the run's checkpoint
    .venv/bin/python scripts/probe_input.py /tmp/hlora-s1
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from hlora.data.glue import get_task, load_split
from hlora.data.tokenize import encode, make_collator
from hlora.evaluation import predict_logits, prediction_spread, task_metrics
from hlora.export import load_model_folder, read_export_info

_LAYER = re.compile(r"\.layer\.(\d+)\.")  # a LoRA tensor's encoder layer


@torch.no_grad()
def cls_spread(module: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Per hidden state (embeddings, then each layer): the standard deviation over all rows of the
    `[CLS]` (first) token's vector, mean over its dimensions."""
    module.eval()
    per_batch = [
        [hidden[:, 0].float() for hidden in module(**inputs, output_hidden_states=True).hidden_states]
        for inputs in ({k: v for k, v in batch.items() if k != "labels"} for batch in batches)
    ]
    layers = zip(*per_batch, strict=True)  # each hidden state's [CLS] vectors, batch by batch
    return [float(torch.cat(layer).std(dim=0, unbiased=False).mean()) for layer in layers]


def lora_layers(module: nn.Module) -> dict[int, list[nn.Parameter]]:
    """The `lora_B` parameters of each encoder layer (the factor whose zero removes the update)."""
    layers: dict[int, list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        match = _LAYER.search(name)
        if "lora_B" in name and match:
            layers.setdefault(int(match[1]), []).append(param)
    return dict(sorted(layers.items()))


def ablations(module: nn.Module, score: Callable[[], dict[str, float]]) -> dict[str, dict[str, float]]:
    """`score()` as the module is, without each layer's LoRA update (`lora_B` zeroed), and without any;
    the module is restored before this returns."""
    layers = lora_layers(module)
    kept = {id(p): p.detach().clone() for params in layers.values() for p in params}
    results = {"as exported": score()}
    try:
        for dropped in [*([layer] for layer in layers), list(layers)]:
            with torch.no_grad():
                for layer, params in layers.items():
                    for p in params:
                        p.copy_(torch.zeros_like(p) if layer in dropped else kept[id(p)])
            tag = f"without layer {dropped[0]}'s update" if len(dropped) == 1 else "without any LoRA update"
            results[tag] = score()
    finally:
        with torch.no_grad():
            for params in layers.values():
                for p in params:
                    p.copy_(kept[id(p)])
    return results


def probe(folder: Path, split: str = "dev", data_dir: Path | None = None, max_samples: int | None = None,
          batch_size: int = 64) -> dict[str, object]:  # fmt: skip
    """The `[CLS]` spread by layer and the ablations' scores of the exported model in `folder`."""
    info = read_export_info(folder)
    spec = get_task(info["task"])
    loaded = load_model_folder(folder, spec.num_labels, "cpu")
    rows = load_split(spec, split, data_dir).head(max_samples)
    data = encode(rows, loaded.tokenizer, int(info.get("max_length", 128)))
    collate = make_collator(loaded.tokenizer)
    batches = [collate([data[i] for i in range(j, min(j + batch_size, len(data)))])
               for j in range(0, len(data), batch_size)]  # fmt: skip

    def score() -> dict[str, float]:
        logits = predict_logits(loaded.module, data, batch_size, collate, "cpu")
        spread = prediction_spread(logits)
        return {**task_metrics(spec, data.labels, logits.argmax(axis=1)), "logit_std": spread["logit_std"],
                "predicted_majority": max(spread["predicted_share"].values())}  # fmt: skip

    return {"cls_spread": cls_spread(loaded.module, batches), "ablations": ablations(loaded.module, score)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="exported adapter folders (hlora export)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--data-dir", type=Path, default=None, help="GLUE TSV folder")
    parser.add_argument("--max-samples", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for folder in args.folders:
        found = probe(folder, args.split, args.data_dir, args.max_samples)
        print(f"{folder}\n  [CLS] spread, embeddings to the last layer: "
              + " ".join(f"{s:.4f}" for s in found["cls_spread"]))  # fmt: skip
        for tag, s in found["ablations"].items():
            print(f"  {tag:28s} accuracy {s['accuracy']:.4f}  logit spread {s['logit_std']:.4f}  "
                  f"largest class share {s['predicted_majority']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
