"""The shared base model with one PEFT slot per rank: adapters go in and come out unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hlora import simulation
from hlora.config import LoraSettings, validate_settings
from hlora.errors import ConfigError, ModelError
from hlora.federation.prepared import prepare
from hlora.models.lora_model import LoraModel, check_fit, load_base, usable_positions
from hlora.rundir import create_run_dir
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


# --- a model whose tokenizer has no pad token (GPT-2's) --------------------------------------------------


def gpt2_dir(root: Path, eos: bool) -> Path:
    """A tiny random GPT-2 with a word-level tokenizer that has no pad token (GPT-2's own has none either),
    with an end-of-sequence token or without one; built here, no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "the", "a", "of", "and", "to", "in", "is", "said", ".", ","]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<eos>" if eos else None,
        model_input_names=["input_ids", "attention_mask"],
    )
    assert tokenizer.pad_token is None
    config = GPT2Config(vocab_size=len(words), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=2)
    path = root / f"gpt2-{'eos' if eos else 'no-eos'}"
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gpt2_settings(model_dir: Path, glue_dir: Path, out_rows: int = 16):
    return validate_settings(
        {
            "run": {"device": "cpu"},
            "data": {"data_dir": str(glue_dir), "max_length": 32, "max_train_samples": out_rows,
                     "max_eval_samples": 8},
            "model": {"name_or_path": str(model_dir)},
            "lora": {"rank": 2, "target_modules": ["c_attn"]},
            "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 1, "min_client_size": 4},
            "train": {"batch_size": 4, "local_steps": 1},
        }
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")  # PEFT on GPT-2's Conv1D, as expected
def test_a_tokenizer_without_pad_token_pads_with_eos_and_the_run_trains(tmp_path, glue_dir):
    settings = gpt2_settings(gpt2_dir(tmp_path, eos=True), glue_dir)
    loaded = load_base(settings.model, num_labels=2, seed=0)
    assert loaded.tokenizer.pad_token == "<eos>"
    assert loaded.model.config.pad_token_id == loaded.tokenizer.eos_token_id == 1
    summary = simulation.run(prepare(settings), create_run_dir(tmp_path / "run"), progress=False)
    assert 0 <= summary["final_accuracy"] <= 1


def test_a_tokenizer_without_pad_nor_eos_token_is_refused(tmp_path, glue_dir):
    settings = gpt2_settings(gpt2_dir(tmp_path, eos=False), glue_dir)
    with pytest.raises(ModelError, match="has no pad token and no end-of-sequence token"):
        prepare(settings)


# --- settings the model cannot serve, found without loading its weights ---------------------------------


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"target_modules": ["query", "nope"]}, "lora.target_modules: 'nope' names no module"),
        ({"target_modules": ["attention"]}, "names bert.encoder.layer.0.attention, a BertAttention"),
        ({"modules_to_save": ["nope"]}, "lora.modules_to_save: 'nope' names no module"),
        ({"rank": 33}, "lora.rank 33 is above min(m, n) = 32 of bert.encoder.layer.0.attention.self.query"),
        ({"target_modules": ["classifier"], "rank": 3}, "lora.rank 3 is above min(m, n) = 2 of classifier"),
        ({"rank_policy": "tiers", "tiers": [2, 40]}, "lora.tiers rank 40 is above min(m, n) = 32"),
        ({"rank": 4, "bank_rank": 33}, "lora.bank_rank 33 is above min(m, n) = 32"),
    ],
)
def test_check_fit_refuses_what_the_model_cannot_serve(tiny_model_dir, lora, message):
    settings = validate_settings({"model": {"name_or_path": str(tiny_model_dir)}, "lora": lora})
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_fit(settings)


def test_check_fit_passes_what_fits(tiny_model_dir):
    check_fit(validate_settings({"model": {"name_or_path": str(tiny_model_dir)}, "lora": {"rank": 32}}))
    check_fit(validate_settings({"lora": {"rank": 384}, "data": {"max_length": 512}}))  # the packaged one
    with pytest.raises(ModelError, match="data.max_length 513 is above the 512 positions"):
        check_fit(validate_settings({"data": {"max_length": 513}}))


def test_positions_of_roberta_style_models_leave_out_the_padding_offset():
    from transformers import BertConfig, RobertaConfig

    assert usable_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert usable_positions(BertConfig(max_position_embeddings=512)) == 512
