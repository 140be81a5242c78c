"""Shared fixtures: a tiny random BERT (2 layers, hidden 32) saved as a real model folder, the shared
GLUE files, and small configs. Nothing here touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the tiny models gain nothing from more, and on a shared machine torch's threads contend
# (a tiny round took ~9 s with 2 threads beside other jobs, 0.4 s with 1). Subprocesses inherit it, so
# bitwise comparisons across processes run with one thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

# Property tests draw the same examples on every run ("ci", the default), so that the suite is red only
# for a reason someone can reproduce; `HYPOTHESIS_PROFILE=explore pytest ...` draws fresh examples to look
# for new failures (a failure prints the seed that reproduces it).
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from hlora.config import DEFAULT_MODEL, Settings, validate_settings  # noqa: E402


def load_script(name: str):
    """`scripts/<name>.py` as a module (the scripts are no package), for their tests."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_bert(num_labels: int = 2, vocab_size: int = 30522, seed: int = 0):
    """A randomly initialised BERT for sequence classification that builds in milliseconds."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


@pytest.fixture(scope="session")
def packaged_tokenizer():
    from transformers import AutoTokenizer

    from hlora.models.lora_model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, packaged_tokenizer) -> Path:
    """A tiny random BERT saved with the packaged model's tokenizer, loadable by path."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(vocab_size=packaged_tokenizer.vocab_size).save_pretrained(path)
    packaged_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    from hlora.data.glue import find_glue_dir

    found = find_glue_dir()
    if found is None:
        pytest.fail("the shared GLUE folder (../shared/glue) is missing: the tests need it")
    return found


@pytest.fixture
def tiny_settings(tiny_model_dir, glue_dir) -> Settings:
    """Three clients, two rounds, 48 MRPC rows: the round loop end to end in a second or two."""
    return validate_settings(
        {
            "run": {"seed": 0, "device": "cpu"},
            "data": {
                "task": "mrpc",
                "data_dir": str(glue_dir),
                "max_length": 48,
                "max_train_samples": 48,
                "max_eval_samples": 32,
            },
            "model": {"name_or_path": str(tiny_model_dir)},
            "lora": {"rank": 4},
            "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2, "min_client_size": 4},
            "train": {"lr": 5e-3, "batch_size": 8, "local_steps": 2},
            "eval": {"batch_size": 16},
        }
    )
