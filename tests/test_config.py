"""Config parsing: TOML plus overrides into typed settings, with errors that name the key."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import get_args

import pytest

from hlora.config import Settings, apply_override, load_settings, settings_to_toml, validate_settings
from hlora.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid_and_iid():
    s = load_settings(None)
    assert s.data.task == "mrpc"
    assert s.federation.method == "fedit"
    assert math.isinf(s.federation.alpha)
    assert s.lora.target_modules == ["query", "value"]


@pytest.mark.parametrize("name", ["mrpc", "rte", "qqp"])
def test_shipped_configs_load(name):
    s = load_settings(CONFIGS / f"{name}.toml")
    assert s.data.task == name


def test_overrides_are_typed_toml_values():
    s = load_settings(
        None,
        [
            "federation.alpha=0.5",
            "lora.target_modules=['query','key']",
            "train.lr=3e-4",
            "run.name=my-run",
            "federation.alpha=inf",
        ],
    )
    assert math.isinf(s.federation.alpha)
    assert s.lora.target_modules == ["query", "key"]
    assert s.train.lr == pytest.approx(3e-4)
    assert s.run.name == "my-run"


def test_unknown_key_names_it_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"'train.learning_rate'.*allowed in \[train\]: optimizer, lr"):
        load_settings(None, ["train.learning_rate=0.1"])


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        validate_settings({"trian": {"lr": 1}})


def test_bad_value_names_key_and_allowed_values():
    with pytest.raises(ConfigError, match="'train.optimizer'.*'adamw' or 'sgd'"):
        load_settings(None, ["train.optimizer=adam"])
    with pytest.raises(ConfigError, match="'lora.rank'.*greater than or equal to 1"):
        load_settings(None, ["lora.rank=0"])


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown method 'fedsgd'.*allowed: .*fedit"):
        load_settings(None, ["federation.method=fedsgd"])


def test_sample_larger_than_population_is_refused():
    with pytest.raises(ConfigError, match=r"clients_per_round \(5\) exceeds num_clients \(3\)"):
        load_settings(None, ["federation.num_clients=3", "federation.clients_per_round=5"])


def test_malformed_override_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "lr0.1")
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_an_override_that_is_not_utf8_is_a_config_error():
    # What Python makes of argv bytes that are not UTF-8: lone surrogates, which no file can hold.
    arg = b"run.name=caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_settings(None, [arg])


def test_errors_are_one_line():
    for overrides in (["train.batch_size=-1"], ["data.task=sst2"], ["x.y=1"]):
        with pytest.raises(ConfigError) as info:
            load_settings(None, overrides)
        assert "\n" not in str(info.value)


def test_resolved_toml_round_trips():
    s = load_settings(None, ["federation.alpha=inf", "data.max_train_samples=64", "run.name='a \"q\"'"])
    again = Settings.model_validate(tomllib.loads(settings_to_toml(s)))
    assert again == s


@pytest.mark.parametrize(
    "item",
    [
        "train.lr=inf",
        "train.lr=nan",
        "train.head_lr=inf",
        "lora.scale=inf",
        "train.weight_decay=inf",
        "train.local_epochs=inf",
        "train.max_grad_norm=inf",
    ],
)
def test_non_finite_floats_are_refused_naming_the_key(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}'"):
        load_settings(None, [item])


def test_alpha_inf_still_means_iid():
    assert math.isinf(load_settings(None, ["federation.alpha=inf"]).federation.alpha)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63])
def test_seeds_the_rngs_cannot_take_are_refused(seed):
    with pytest.raises(ConfigError, match=r"'run.seed'"):
        load_settings(None, [f"run.seed={seed}"])
    assert load_settings(None, [f"run.seed={2**32 - 1}"]).run.seed == 2**32 - 1


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "a\\\\b", ".", "..", "", " "])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match=r"'run.name': must be a plain folder name"):
        validate_settings({"run": {"name": name}})
    assert validate_settings({"run": {"name": "mrpc-hlora.v2"}}).run.name == "mrpc-hlora.v2"


def test_every_committed_config_and_run_record_still_loads():
    root = CONFIGS.parent
    paths = [*CONFIGS.rglob("*.toml"), *(root / "results").rglob("config.toml")]
    assert len(paths) > 100
    for path in paths:
        load_settings(path)


def test_partition_scheme_and_size_sigma():
    fed = load_settings(None).federation
    assert (fed.partition, fed.size_sigma) == ("classes", 1.0)  # the committed runs' split
    fed = load_settings(None, ["federation.partition='clients'", "federation.size_sigma=0"]).federation
    assert (fed.partition, fed.size_sigma) == ("clients", 0.0)
    for item, message in [
        ("federation.partition='label'", r"'federation.partition'.*'classes' or 'clients' \(got 'label'\)"),
        ("federation.size_sigma=-0.5", r"'federation.size_sigma'.*greater than or equal to 0"),
        ("federation.size_sigma=nan", r"'federation.size_sigma'.*finite"),
        ("federation.size_sigma=inf", r"'federation.size_sigma'.*finite"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            load_settings(None, [item])
        assert "\n" not in str(info.value)


def test_partition_schemes_are_those_the_partition_knows():
    from hlora.config import FederationSettings
    from hlora.data.partition import PARTITION_SCHEMES

    assert get_args(FederationSettings.model_fields["partition"].annotation) == PARTITION_SCHEMES
