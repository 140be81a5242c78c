"""scripts/probe_input.py: the [CLS] spread by layer, and the scores without each layer's LoRA update,
on a tiny random BERT and on a tiny run's export."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hlora.export import export_model
from hlora.federation.prepared import prepare
from tests.conftest import load_script, tiny_bert


@pytest.fixture(scope="module")
def script():
    return load_script("probe_input")


def lora_bert():
    """A tiny BERT with LoRA on query and value of both layers, its `lora_B` random (an update)."""
    model = get_peft_model(tiny_bert(vocab_size=100), LoraConfig(r=2, target_modules=["query", "value"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def test_ablations_drop_one_layers_update_at_a_time_and_restore_the_model(script):
    model = lora_bert()
    inputs = {"input_ids": torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(1))}

    def logits() -> dict[str, float]:
        with torch.no_grad():
            return {"sum": float(model(**inputs).logits.sum())}

    assert sorted(script.lora_layers(model)) == [0, 1] and all(
        len(p) == 2 for p in script.lora_layers(model).values()
    )
    before = logits()
    found = script.ablations(model, logits)
    assert list(found) == [
        "as exported",
        "without layer 0's update",
        "without layer 1's update",
        "without any LoRA update",
    ]
    assert found["as exported"] == before and logits() == before  # restored
    with model.disable_adapter(), torch.no_grad():
        base = float(model(**inputs).logits.sum())
    assert found["without any LoRA update"]["sum"] == pytest.approx(base, abs=1e-5)
    assert len({round(v["sum"], 5) for v in found.values()}) == 4  # each layer's update matters


def test_cls_spread_is_zero_at_the_embeddings_and_measured_at_every_layer(script):
    model = lora_bert()
    ids = torch.randint(1, 100, (6, 7), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 2  # one [CLS] token for every row: its embedding cannot vary over the rows
    batches = [{"input_ids": ids[:3]}, {"input_ids": ids[3:], "labels": torch.zeros(3, dtype=torch.long)}]
    spread = script.cls_spread(model, batches)
    assert len(spread) == 3 and spread[0] == pytest.approx(0.0, abs=1e-6) and min(spread[1:]) > 0
    with torch.no_grad():  # one batch of all rows: the same figures
        whole = script.cls_spread(model, [{"input_ids": ids}])
    assert whole == pytest.approx(spread)


def test_probe_of_an_export_scores_it_as_hlora_eval_does(script, tiny_settings, glue_dir, tmp_path):
    exp = prepare(tiny_settings)
    folder = export_model(exp.server.model_plan(), exp.settings, tmp_path / "export")
    found = script.probe(folder, data_dir=glue_dir, max_samples=20, batch_size=8)
    assert len(found["cls_spread"]) == 3  # the embeddings and the tiny model's 2 layers
    scores = found["ablations"]["as exported"]
    assert (
        0 <= scores["accuracy"] <= 1 and scores["logit_std"] >= 0 and 0.5 <= scores["predicted_majority"] <= 1
    )
    # a freshly exported global adapter has B = 0 (LoRA's start): dropping any update changes nothing
    assert all(s == scores for s in found["ablations"].values())
