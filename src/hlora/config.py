"""Run configuration: one TOML file plus `section.key=value` overrides, validated into typed settings.

Every error names the key and, where there is a fixed set, the allowed values; the command line prints
it as one line and exits with status 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hlora.errors import ConfigError

DEFAULT_MODEL = "packaged:all-MiniLM-L6-v2"
# The largest seed every library a run seeds accepts (numpy's legacy global RNG takes 0 .. 2**32 - 1).
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSettings(_Section):
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # "centralized": one client holding all the data (the upper reference); "local": client `client` of
    # the federated partition training alone on its own data at its own rank (the lower reference).
    mode: Literal["federated", "centralized", "local"] = "federated"
    client: int | None = Field(None, ge=0)  # "local" mode only: the client id, 0 .. num_clients - 1
    device: str = "auto"  # "auto" picks CUDA when present, else CPU; or any torch device string
    name: str | None = None  # run directory name under runs/ when --out is not given

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        # The name goes under runs/: one path component, or the run would be written elsewhere.
        if v is not None and (
            v.strip() in ("", ".", "..") or any(c in v for c in "/\\\0") or Path(v).is_absolute()
        ):
            raise ValueError("must be a plain folder name (no '/', '\\', not '.' or '..')")
        return v


class DataSettings(_Section):
    task: Literal["mrpc", "rte", "qqp"] = "mrpc"
    data_dir: str | None = None  # a GLUE TSV folder; None: HLORA_GLUE_DIR, ../shared/glue, then the hub
    max_length: int = Field(128, ge=8, le=4096)
    max_train_samples: int | None = Field(None, ge=1)  # first N training rows only (smoke tests)
    max_eval_samples: int | None = Field(None, ge=1)

    @field_validator("task", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class ModelSettings(_Section):
    name_or_path: str = DEFAULT_MODEL  # a local folder, a hub id, or the packaged default
    dtype: Literal["float32", "bfloat16"] = "float32"


class LoraSettings(_Section):
    rank: int = Field(8, ge=1)
    # One scaling for every rank: lora_alpha = scale * rank (METHOD.md).
    scale: float = Field(2.0, gt=0, allow_inf_nan=False)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    # Trained, non-LoRA modules (the head); None lets PEFT pick the classifier for sequence classification.
    modules_to_save: list[str] | None = None
    # Each client's rank r_k (METHOD.md "Setting"; assigned by hlora.federation.ranks): "fixed" gives every
    # client `rank`; "tiers" draws from `tiers` by `tier_shares`; "data_size" grows with the client's
    # data-size quantile up to `rank`.
    rank_policy: Literal["fixed", "tiers", "data_size"] = "fixed"
    tiers: list[int] = Field(default_factory=list)  # the ranks of the tiers ("tiers" only)
    tier_shares: list[float] | None = None  # relative share of clients per tier, normalised; None: equal
    bank_rank: int | None = Field(None, ge=1)  # the server's global rank r_g; None: the largest client rank

    @field_validator("tiers")
    @classmethod
    def _tiers_are_ranks(cls, v: list[int]) -> list[int]:
        if any(r < 1 for r in v):
            raise ValueError(f"every tier rank must be >= 1, got {v}")
        return v

    @field_validator("tier_shares")
    @classmethod
    def _shares_are_positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) and x > 0 for x in v):
            raise ValueError(f"every tier share must be a finite number > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _ranks_fit(self) -> LoraSettings:
        if self.rank_policy == "tiers" and not self.tiers:
            raise ValueError('rank_policy "tiers" needs tiers, a list of ranks (e.g. tiers = [2, 4, 8])')
        if self.tier_shares is not None and len(self.tier_shares) != len(self.tiers):
            raise ValueError(
                f"tier_shares has {len(self.tier_shares)} entries but tiers has {len(self.tiers)}: "
                "give one share per tier"
            )
        if self.bank_rank is not None and self.bank_rank < self.max_client_rank:
            raise ValueError(
                f"bank_rank ({self.bank_rank}) is below the largest client rank ({self.max_client_rank}, "
                f"from rank_policy {self.rank_policy!r}): the server's adapter needs room for every "
                "client's rank"
            )
        return self

    @property
    def max_client_rank(self) -> int:
        """The largest rank the rank policy can give a client (`rank`, or the largest tier)."""
        return max(self.tiers) if self.rank_policy == "tiers" else self.rank


def _reference_method() -> str:
    """The default method: the references' rule (`registry.reference()`), for the default fixed rank."""
    from hlora.aggregation import registry

    return registry.reference()


class FederationSettings(_Section):
    method: str = Field(default_factory=lambda: _reference_method())  # FedIT: one rank, plain FedAvg
    num_clients: int = Field(10, ge=1)
    clients_per_round: int = Field(10, ge=1)
    rounds: int = Field(10, ge=1)
    alpha: float = Field(math.inf, gt=0)  # Dirichlet label skew; inf means IID
    # What the Dirichlet draws (hlora.data.partition): "classes", each class's shares over the clients
    # (few clients with much data each); "clients", each client's label mix, with log-normal sizes (many
    # small clients: with 100 clients "classes" leaves some client empty in nearly every draw).
    partition: Literal["classes", "clients"] = "classes"
    # "clients" only: the sigma of the log-normal draw the client sizes are proportional to. 1.0 puts the
    # middle 90% of draws within a factor of 5 (e^1.645) of the median: the varied sizes that ranks by
    # data size need, with no client dwarfing the rest; 0 gives equal sizes, as in Hsu et al. 2019.
    size_sigma: float = Field(1.0, ge=0, allow_inf_nan=False)
    min_client_size: int = Field(8, ge=1)
    # The fewest valid updates a round aggregates; with fewer, the round fails and the global model stays.
    min_clients: int = Field(1, ge=1)
    # Reject an update whose change from what its client was sent has a larger L2 norm (over every tensor
    # it sends up); None: no bound (hlora.federation.validation).
    max_update_norm: float | None = Field(None, gt=0)
    # Reject an update whose change norm exceeds this many times the lower median of the round's valid
    # updates' change norms (an "outlier": a boosted update); inf switches it off. 20 is 3 times the
    # largest honest ratio in the committed runs (6.19) and 5 times below the smallest ratio of an update
    # boosted 1e3 times there (109): scripts/update_norm_factor.py.
    update_norm_factor: float = Field(20.0, ge=1)

    @model_validator(mode="after")
    def _sample_fits(self) -> FederationSettings:
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})"
            )
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"min_clients ({self.min_clients}) exceeds clients_per_round ({self.clients_per_round}): "
                "no round could ever aggregate"
            )
        return self


class TrainSettings(_Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    # The learning rate of the trained non-LoRA modules (lora.modules_to_save: the head, and a pooler
    # when it trains); None: `lr`. Pre-trained dense weights usually want a smaller step than LoRA.
    head_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    batch_size: int = Field(16, ge=1)
    local_epochs: float = Field(1.0, gt=0, allow_inf_nan=False)  # used when local_steps is 0
    local_steps: int = Field(0, ge=0)  # > 0: exactly this many steps per round, cycling the data
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD only
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)  # None: no clipping
    # Batches of rows of similar length (shuffled in groups of 50 batches, as transformers' Trainer does):
    # less padding, so more rows a second, at the price of less random batches.
    group_by_length: bool = False
    # "bf16": forward and backward under bfloat16 autocast (weights, gradients and optimizer state stay
    # float32). Faster on GPUs and on CPUs with native bfloat16 (AVX512-BF16, AMX); slower elsewhere.
    precision: Literal["fp32", "bf16"] = "fp32"


class EvalSettings(_Section):
    batch_size: int = Field(64, ge=1)
    # Also score the adapter each client rank tier holds (the global one cut to its rank): one more pass
    # over the dev set per tier whose adapter differs from the global one. True: every scored round; "final":
    # the last round only (what the comparison's tier table needs, for a fraction of the passes).
    tiers: bool | Literal["final"] = True
    # Score only the rounds divisible by `every`, and the last: on a long run a dev pass (and one per tier)
    # costs as much as several clients' training. It changes no global adapter, only which rows have scores.
    every: int = Field(1, ge=1)


# The ways hlora.federation.faults can mangle an update, each one a reason validation rejects it for
# (a "scale" one as an outlier by default, or by federation.max_update_norm where set).
CorruptKind = Literal["nan", "inf", "shape", "rank", "missing", "extra", "dtype", "scale", "weight"]
CORRUPT_KINDS: tuple[str, ...] = get_args(CorruptKind)


class FaultSettings(_Section):
    """Faults injected into the simulation (hlora.federation.faults): each sampled client, each round,
    crashes before it replies, times out (its reply is discarded), or sends a corrupted update, with these
    probabilities (exclusive: they add up to at most 1). Off by default."""

    crash: float = Field(0.0, ge=0, le=1)
    timeout: float = Field(0.0, ge=0, le=1)
    corrupt: float = Field(0.0, ge=0, le=1)
    # How a corrupted update is mangled: one of CORRUPT_KINDS, or "any" (drawn per corrupted client).
    corrupt_kind: Literal[CorruptKind, "any"] = "any"

    @model_validator(mode="after")
    def _shares_fit(self) -> FaultSettings:
        if self.crash + self.timeout + self.corrupt > 1:
            raise ValueError(
                f"crash + timeout + corrupt is {self.crash + self.timeout + self.corrupt:g}, above 1: "
                "a client has at most one fault per round"
            )
        return self


class SecureSettings(_Section):
    """Secure two-stage aggregation (`hlora.secure.two_stage`, `hlora.federation.secure`): the server sees
    only sums of the clients' contributions, never an update, and still gets the product mean's best
    factors at the bank rank. What it gives up (no per-update validation, no defence against a poisoned
    sum) is in the README's "Secure aggregation". Off by default; a config without it runs as before."""

    enabled: bool = False
    # q, the columns of the random sketch `Omega` per adapted weight; 0: the round's total client rank,
    # with which the result is exact. Below it the result is a randomised SVD (Halko et al. 2011).
    sketch_rank: int = Field(0, ge=0)
    # Power iterations of the range finder: each costs two more secure sums, and sharpens a sketch
    # narrower than the rank of the product mean.
    power_iterations: int = Field(0, ge=0, le=16)
    # The fewest clients whose contributions a secure sum needs (the summation's Shamir threshold); None:
    # the summation's default.
    threshold: int | None = Field(None, ge=1)
    # A client in one secure sum of the round and missing from a later one: "fail" the round (the
    # default: with q covering the rank, the difference of the two sums' means shows that client's sketch
    # `p_k B_k A_k Omega` to the server) or "renormalise" over the later sum's clients (exact, not private).
    stage_dropouts: Literal["fail", "renormalise"] = "fail"
class PrivacySettings(_Section):
    """Client-level differential privacy (DP-FedAvg in product space, `hlora.privacy`; README "Privacy").
    Off unless `clip` is set; a config without `[privacy]` runs and is fingerprinted as before it existed."""

    # C: each client's change (product space, head included) is scaled to an L2 norm of at most C.
    clip: float | None = Field(None, gt=0, allow_inf_nan=False)
    # z: the Gaussian noise on the mean of the clipped changes has standard deviation z * C / m
    # (m = federation.clients_per_round). 0: clipping only, no privacy guarantee (epsilon is infinite).
    noise_multiplier: float = Field(0.0, ge=0, allow_inf_nan=False)
    # The delta of the reported (epsilon, delta); None: 1 / num_clients**1.1, just below 1 / num_clients
    # (a delta of 1 / N allows a mechanism that publishes one client's data outright).
    delta: float | None = Field(None, gt=0, lt=1)
    # Stop before a round whose release would take epsilon above this; None: play every round.
    epsilon_budget: float | None = Field(None, gt=0, allow_inf_nan=False)
    # True: the noise is drawn from the operating system's CSPRNG (`secrets`), not reproducible. False:
    # from the run's seed (`seeding.noise_seed`), reproducible, for experiments only: anyone who knows
    # the seed can subtract the noise.
    secure_noise: bool = False

    @property
    def enabled(self) -> bool:
        return self.clip is not None

    @model_validator(mode="after")
    def _coherent(self) -> PrivacySettings:
        if self.clip is None:
            if self.noise_multiplier > 0:
                raise ValueError("privacy.noise_multiplier needs privacy.clip: the noise is scaled to it")
            others = [k for k in ("delta", "epsilon_budget") if getattr(self, k) is not None]
            others += ["secure_noise"] if self.secure_noise else []
            if others:
                raise ValueError(f"privacy.{others[0]} needs privacy.clip: privacy is on only with a clip")
        if self.epsilon_budget is not None and self.noise_multiplier == 0:
            raise ValueError(
                "privacy.epsilon_budget needs privacy.noise_multiplier > 0: without noise epsilon is infinite"
            )
        return self

    def resolved_delta(self, num_clients: int) -> float:
        """`delta`, or its default `1 / num_clients**1.1`."""
        return self.delta if self.delta is not None else 1.0 / num_clients**1.1


class Settings(_Section):
    """The whole run configuration (the resolved form is saved as `config.toml` in the run)."""

    run: RunSettings = Field(default_factory=RunSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    faults: FaultSettings = Field(default_factory=FaultSettings)
    secure: SecureSettings = Field(default_factory=SecureSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    # The chosen method's options (its `Options` model says which keys it takes); kept as written, so
    # that the saved config round-trips, and validated here and again when the method is created.
    method_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _local_client(self) -> Settings:
        if self.run.mode == "local" and self.run.client is None:
            raise ValueError('run.mode "local" needs run.client, the id of the client that trains alone')
        if self.run.client is not None and self.run.client >= self.federation.num_clients:
            raise ValueError(
                f"run.client ({self.run.client}) is not a client id: ids run from 0 to "
                f"federation.num_clients - 1 ({self.federation.num_clients - 1})"
            )
        return self

    @model_validator(mode="after")
    def _secure_fits(self) -> Settings:
        sec = self.secure
        if not sec.enabled:
            return self
        from hlora.aggregation import registry

        method = self.federation.method
        if method in registry.names() and registry.get(method).secure_refactor is None:
            able = [name for name in registry.ordered() if registry.get(name).secure_refactor is not None]
            raise ValueError(
                f"secure.enabled: method {method!r} cannot be computed from sums of client contributions; "
                f"methods that can: {', '.join(able)}"
            )
        if self.run.mode != "federated":
            raise ValueError(f'secure.enabled: run.mode {self.run.mode!r} has no federation to secure')
        if self.faults.corrupt > 0:
            raise ValueError(
                "secure.enabled with faults.corrupt > 0: the server sees no update, so it cannot refuse a "
                "corrupted one (secure aggregation gives up per-update validation)"
            )
        bank = self.lora.bank_rank if self.lora.bank_rank is not None else self.lora.max_client_rank
        if 0 < sec.sketch_rank < bank:
            raise ValueError(
                f"secure.sketch_rank ({sec.sketch_rank}) is below the server's bank rank ({bank}): the "
                f"global adapter would lose components; use 0 (the round's total client rank) or >= {bank}"
            )
        if sec.threshold is not None and sec.threshold > self.federation.clients_per_round:
            raise ValueError(
                f"secure.threshold ({sec.threshold}) exceeds federation.clients_per_round "
                f"({self.federation.clients_per_round}): no secure sum could ever be opened"
            )
        return self

    @model_validator(mode="after")
    def _known_method(self) -> Settings:
        from hlora.aggregation import registry

        if self.federation.method not in registry.names():
            raise ValueError(
                f"federation.method: unknown method {self.federation.method!r}; "
                f"allowed: {', '.join(registry.names())}"
            )
        try:
            registry.validate_options(self.federation.method, self.method_options)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> Settings:
        """[privacy] only where it means client-level DP: a method with `private_space` (the references'
        modes drop [privacy] in `effective_settings`, so `hlora compare`'s references still run)."""
        privacy = self.privacy
        if not privacy.enabled or self.run.mode != "federated":
            return self
        from hlora.aggregation import registry

        method = registry.get(self.federation.method)
        why = method.private_refusal(registry.validate_options(self.federation.method, self.method_options))
        if why is not None:
            raise ValueError(f"[privacy] with federation.method {self.federation.method!r}: {why}")
        n = self.federation.num_clients
        if privacy.delta is not None and privacy.delta >= 1 / n:
            raise ValueError(
                f"privacy.delta ({privacy.delta:g}) must be below 1 / federation.num_clients ({1 / n:g}): "
                "a larger delta allows publishing one client's data outright"
            )
        return self


def flat_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """A settings dump (`Settings.model_dump()`, or its JSON) keyed `section.key`, in config order; lists
    and the values of `method_options` entries stay whole (`method_options.<name>`)."""
    out: dict[str, Any] = {}
    for section, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update({f"{section}.{key}": item for key, item in value.items()})
        else:
            out[section] = value
    return out


def settings_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every `section.key` whose values differ between two settings dumps (`flat_settings`), in `a`'s
    order and then `b`'s keys that `a` lacks, with both values (None where a dump has no such key)."""
    fa, fb = flat_settings(a), flat_settings(b)
    keys = list(fa) + [key for key in fb if key not in fa]
    missing = object()
    return [
        (key, fa.get(key), fb.get(key)) for key in keys if fa.get(key, missing) != fb.get(key, missing)
    ]


def load_settings(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Read a TOML config (or the defaults when `path` is None), apply `section.key=value` overrides,
    and validate. Raises ConfigError with one line that names the problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} nests arrays or tables too deeply") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
    for item in overrides:
        apply_override(raw, item)
    return validate_settings(raw)


def validate_settings(raw: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is read as a TOML value when it parses as
    one (numbers, booleans, lists, quoted strings, inf) and as a bare string otherwise."""
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that were not UTF-8 arrive as lone surrogates
        raise ConfigError(f"override {item!r} is not valid UTF-8 text") from None
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    *sections, leaf = key.split(".")
    node = raw
    for name in sections:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {name!r} is not a section")
        node = child
    node[leaf] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise ConfigError(f"override value {text[:20]!r}... nests arrays or tables too deeply") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in err["loc"][:-1])
        allowed = _allowed_keys(err["loc"][:-1])
        return f"unknown config key {where!r}" + (
            f"; allowed in [{section}]: {', '.join(allowed)}"
            if section
            else f"; sections: {', '.join(allowed)}"
        )
    if isinstance(err.get("input"), dict) and err["type"] == "value_error" and where:
        return f"config [{where}]: {msg}"  # a check across a section's keys; the message names them
    if "input" in err and err["type"] != "missing" and where:
        return f"config key {where!r}: {msg} (got {err['input']!r})"
    return f"config {where + ': ' if where else ''}{msg}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation  # type: ignore[assignment]
    return list(model.model_fields)


def settings_to_toml(settings: Settings) -> str:
    """The resolved settings as TOML text (what the run directory records, and what a Flower node is
    sent). A setting that is unset (None) is left out: TOML has no null, and reading the text back gives
    its default."""

    def present(values: Any) -> Any:
        if isinstance(values, Mapping):
            return {k: present(v) for k, v in values.items() if v is not None}
        return values

    return tomli_w.dumps(present(_without_default_sections(settings.model_dump())))


# Sections added after runs were committed: left out of the recorded config and of the fingerprint
# while they hold their defaults, so that a config without them records, fingerprints and resumes as
# before they existed.
_OPTIONAL_SECTIONS: dict[str, type[_Section]] = {"secure": SecureSettings, "privacy": PrivacySettings}


def _without_default_sections(data: dict[str, Any]) -> dict[str, Any]:
    """A settings dump less the optional sections that hold their defaults."""
    for name, section in _OPTIONAL_SECTIONS.items():
        if name in data and data[name] == section().model_dump():
            del data[name]
    return data


# The reference runs, and what identifies a run's config: `hlora.checkpoint` and `hlora compare` use these.


def effective_settings(settings: Settings) -> Settings:
    """The centralised reference is the federated loop with one client that holds all the data (the
    aggregate of one update is that update), so it needs no loop of its own. It trains at the rank the
    federated run's server holds (`bank_rank`, else the largest rank the policy gives).

    The local reference (`run.mode = "local"`) is the same loop with one client too: `prepare` splits the
    data as the federated run does (`num_clients`, `alpha`, seed), then keeps client `run.client`'s part
    and rank alone. Here only what needs no data changes: FedIT (the identity on one update), one client a
    round, no bank rank above the client's own."""
    from hlora.aggregation import registry

    if settings.run.mode != "federated" and settings.privacy.enabled:
        # Client-level DP is a property of the federated run; the references are its yardsticks.
        settings = settings.model_copy(update={"privacy": PrivacySettings()})
    if settings.run.mode == "local":
        fed = settings.federation.model_copy(
            update={"method": registry.reference(), "clients_per_round": 1, "min_clients": 1}
        )
        return settings.model_copy(
            update={
                "federation": fed,
                "lora": settings.lora.model_copy(update={"bank_rank": None}),
                "method_options": {},
            }
        )
    if settings.run.mode != "centralized":
        return settings
    lora = settings.lora
    rank = lora.bank_rank if lora.bank_rank is not None else lora.max_client_rank
    central_lora = lora.model_copy(update={"rank_policy": "fixed", "rank": rank, "bank_rank": None})
    fed = settings.federation
    central = FederationSettings(
        method=registry.reference(),
        num_clients=1,
        clients_per_round=1,
        rounds=fed.rounds,
        alpha=math.inf,
        min_client_size=1,
        max_update_norm=fed.max_update_norm,
    )
    return settings.model_copy(update={"federation": central, "lora": central_lora, "method_options": {}})


def fingerprinted(settings: Settings) -> dict[str, Any]:
    """What the fingerprint covers, as JSON: the resolved config less what a resume may change
    (`federation.rounds`) and what does not change results (`run.name`)."""
    data = _without_default_sections(settings.model_dump())
    del data["federation"]["rounds"], data["run"]["name"]
    return json.loads(json.dumps(data))


def fingerprint(settings: Settings) -> str:
    """The sha256 of `fingerprinted(settings)`."""
    return settings_digest(fingerprinted(settings))


def settings_digest(data: Mapping[str, Any]) -> str:
    """The sha256 of a settings dump as JSON with sorted keys: `fingerprint` of what `fingerprinted` gave."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def config_differences(stored: Mapping[str, Any], settings: Settings) -> list[tuple[str, Any, Any]]:
    """The `section.key`s in which a checkpoint's config (`stored`, `fingerprinted()` when it was written)
    and `settings` differ, with both values (None where one has no such key), less the settings absent
    from `stored` that hold their default in `settings`: a later hlora's additions."""
    # Every section's defaults, the optional ones too: a key added to [secure] since a secure run began
    # is such an addition as much as a key added to [train].
    recorded, defaults = flat_settings(stored), flat_settings(json.loads(json.dumps(Settings().model_dump())))
    return [
        (key, was, now)
        for key, was, now in settings_differences(stored, fingerprinted(settings))
        if key in recorded or key not in defaults or now != defaults[key]
    ]
