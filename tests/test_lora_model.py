"""The shared base model with one PEFT slot per rank: adapters go in and come out unchanged."""

from __future__ import annotations

import pytest
import torch

from hlora.config import LoraSettings
from hlora.models.lora_model import LoraModel
from hlora.weights import AdapterWeights, LoraFactors
from tests.conftest import tiny_bert


@pytest.fixture
def model() -> LoraModel:
    return LoraModel(tiny_bert(vocab_size=100), LoraSettings(rank=4), torch.device("cpu"))


def random_adapter(template: AdapterWeights, rank: int, seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    factors = {
        name: LoraFactors(
            torch.randn(f.B.shape[0], rank, generator=g), torch.randn(rank, f.A.shape[1], generator=g)
        )
        for name, f in template.factors.items()
    }
    dense = {name: torch.randn(t.shape, generator=g) for name, t in template.dense.items()}
    return AdapterWeights(factors, dense)


def test_initial_adapter_is_peft_init_and_seeded(model):
    a = model.initial_weights(4, seed=1)
    b = model.initial_weights(4, seed=1)
    c = model.initial_weights(4, seed=2)
    # two layers x (query, value), each B 32 x 4 and A 4 x 32; the head is the classifier
    assert len(a.factors) == 4 and a.rank == 4
    assert set(a.dense) == {"classifier.weight", "classifier.bias"}
    assert all(torch.count_nonzero(f.B) == 0 for f in a.factors.values())
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))
    assert not all(torch.equal(x.A, y.A) for x, y in zip(a.factors.values(), c.factors.values(), strict=True))


def test_load_then_read_round_trips_each_rank(model):
    template = model.initial_weights(4, seed=0)
    for rank in (1, 4, 2):
        w = random_adapter(template, rank, seed=rank)
        model.load(w)
        assert model.active_rank == rank
        back = model.read()
        for name, t in w.tensors().items():
            assert torch.equal(back.tensors()[name], t), name


def test_only_the_active_slot_trains(model):
    template = model.initial_weights(4, seed=0)
    model.load(random_adapter(template, 2, seed=0))
    trainable = {id(p) for p in model.module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.trainable_parameters()}
    # 4 adapted weights x 2 factors + head weight and bias
    assert len(trainable) == 10


def test_slots_are_per_rank_not_per_client(model):
    template = model.initial_weights(4, seed=0)
    for client in range(20):
        model.load(random_adapter(template, 1 + client % 3, seed=client))
    assert sorted(model._slots) == [1, 2, 3, 4]


def test_slot_changes_the_forward(model):
    template = model.initial_weights(4, seed=0)
    x = {"input_ids": torch.tensor([[1, 5, 7, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    model.load(template)
    before = model.module(**x).logits
    model.load(random_adapter(template, 4, seed=3))
    assert not torch.allclose(before, model.module(**x).logits)


def test_mismatched_adapter_is_refused(model):
    template = model.initial_weights(4, seed=0)
    broken = AdapterWeights({k: v for k, v in list(template.factors.items())[:-1]}, template.dense)
    with pytest.raises(ValueError, match="does not match the model"):
        model.load(broken)
