"""The run config: one TOML file describes a whole training run.

A run config is a tree of small pydantic models, one per component (coordinator,
model, data, LR schedule, optimizer), in the style of torchtitan: each field says
its unit and how it interacts with others. Validation happens once, when the tree
is built, by :func:`load_config` / :func:`parse_config`; every problem is reported
with the dotted path of the field and the rule it broke, all at once:

    >>> parse_config({"name": "x", "coordinator": {"warmup_time": 0}})  # doctest: +SKIP
    ConfigError: run config: coordinator.warmup_time: Input should be greater than 0 (got 0)
    ...

This module imports no torch: the coordinator, the server and the CLI read it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoordinatorConfig(_Section):
    """Timing, membership and batch-size rules the coordinator enforces. Times are seconds."""

    warmup_time: int = Field(30, gt=0, description="Seconds for warmup (model download) before round 1.")
    cooldown_time: int = Field(10, gt=0, description="Seconds at the end of an epoch for checkpointing.")
    max_round_train_time: int = Field(30, gt=0, description="Upper bound on one round's training phase.")
    round_witness_time: int = Field(5, gt=0, description="Seconds late witnesses are waited for once a quorum reported; the round goes on at once when all have.")
    epoch_time: int = Field(600, gt=0, description="Wall time of one epoch; must exceed warmup_time + cooldown_time.")
    total_steps: int = Field(100, gt=0, description="The run is Finished after this many optimizer steps.")
    init_min_clients: int = Field(1, ge=1, description="Clients needed before the first epoch starts.")
    min_clients: int = Field(1, ge=1, description="Below this many healthy clients the epoch ends.")
    witness_nodes: int = Field(0, ge=0, description="Witnesses per round; 0 means every client, up to 32.")
    global_batch_size_start: int = Field(16, gt=0, description="Sequences per step at the start of the run.")
    global_batch_size_end: int = Field(16, gt=0, description="Sequences per step once warmup tokens are reached.")
    global_batch_size_warmup_tokens: int = Field(0, ge=0, description="Tokens over which the batch size ramps from start to end (0 = no ramp).")
    waiting_for_members_extra_time: int = Field(3, ge=0, description="Seconds to wait for more members once init_min_clients joined.")
    cold_start_warmup_steps: int = Field(0, ge=0, description="Steps after a (re)start during which the LR warms up again.")
    epoch_reward: int = Field(1000, ge=0, description="Points shared at each epoch end by the healthy clients, in proportion to the tokens each trained and had accepted.")
    checkpointers: int = Field(1, ge=0, description="How many clients write a checkpoint at cooldown (0 = none).")
    shares: Literal["speed", "even"] = Field("speed", description="How each round's batch is cut among trainers: "
                                             "'speed' in proportion to the throughput the run measured, 'even' equally.")
    verifiers: int = Field(3, ge=0, le=8, description="Witnesses that check each result against its trainer's assigned "
                           "data each round; a result a majority of them finds wrong is applied by nobody and its "
                           "trainer is dropped (0 = results are not checked). Rounds of fewer than 5 trainers are not "
                           "checked: too few results to compare.")
    access: Literal["open", "gated"] = Field("open", description="Who may join: 'open' any key; 'gated' only keys the "
                                             "run authority granted (psyche authorize), or an authorizer it delegated "
                                             "to granted for a term.")


class ModelConfig(_Section):
    """A LLaMA-style causal LM, built fresh from these sizes or loaded from ``checkpoint``."""

    architecture: Literal["llama"] = "llama"
    checkpoint: str | None = Field(None, description="A save_pretrained folder to start from; sizes then come from it.")
    vocab_size: int = Field(4096, gt=0, description="Must be >= the tokenizer's vocabulary size.")
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(352, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(4, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = False
    seq_len: int = Field(128, gt=1, description="Tokens per training sequence (each sample holds seq_len + 1).")
    init_seed: int = Field(0, description="Seed of the fresh initialisation in epoch 0 (same on every client).")


class DataConfig(_Section):
    """Where the pre-tokenized training data lives."""

    location: str = Field("data/fortunes", description="A folder with train.bin/val.bin/meta.json, an http(s) URL of one, or a data server URL. "
                          "A relative folder in a config file is relative to that file's folder (see RunConfig.data_location).")
    provider: Literal["auto", "local", "http", "server"] = Field("auto", description="'auto' picks by the location's form.")
    shuffle_seed: int = Field(0, description="Seed that maps sample indices onto sequences of the token file.")


class LRScheduleConfig(_Section):
    """The learning rate as a function of the step (see :mod:`psyche.train.schedule`)."""

    kind: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    peak_lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    final_lr: float = Field(1e-4, ge=0, description="LR reached at total_steps (linear, cosine, wsd).")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd only: fraction of steps spent decaying.")


class KindCodecConfig(_Section):
    """DisTrO's codec options for one kind of tensor (``[optimizer.kinds.matrix]`` and so on), over the section's."""

    compression_decay: float | None = Field(None, ge=0, lt=1, description="Momentum decay β for this kind.")
    chunk: int | None = Field(None, gt=0, description="DCT tile edge for this kind.")
    topk: int | None = Field(None, gt=0, description="Coefficients kept per chunk × chunk DCT tile for this kind.")
    one_bit: bool | None = Field(None, description="Send only the sign of each kept coefficient of this kind.")


class OptimizerConfig(_Section):
    """The optimizer each client runs; ``distro`` exchanges compressed results between peers."""

    kind: Literal["distro", "adamw"] = "distro"
    compression_decay: float | None = Field(None, ge=0, lt=1, description="Momentum decay β of DisTrO (unset: DisTrO's default).")
    chunk: int | None = Field(None, gt=0, description="DCT tile edge (largest divisor of each dim <= chunk) (unset: DisTrO's default, 32).")
    topk: int | None = Field(None, gt=0, description="Coefficients kept per chunk × chunk DCT tile (unset: DisTrO's default, 2).")
    one_bit: bool = Field(True, description="Send only the sign of each kept coefficient.")
    weight_decay: float = Field(0.0, ge=0)
    embedding_lr_scale: float | None = Field(None, gt=0, description="DisTrO LR multiplier for token embeddings and the output head (unset: DisTrO's default).")
    matrix_lr_scale: float | None = Field(None, gt=0, description="DisTrO LR multiplier for the other weight matrices (unset: DisTrO's default).")
    vector_lr_scale: float | None = Field(None, gt=0, description="DisTrO LR multiplier for 1-D tensors, norm weights and biases (unset: DisTrO's default).")
    matrix_update: Literal["orthogonal", "sign"] | None = Field(None, description="How DisTrO steps weight matrices: 'orthogonal' (Muon-style) or 'sign' (DeMo) (unset: DisTrO's default, orthogonal).")
    embedding_update: Literal["row_rms", "sign"] | None = Field(None, description="How DisTrO steps token embeddings and the output head: 'sign' (DeMo) or 'row_rms' (each token's row at RMS 1) (unset: DisTrO's default, sign).")
    kinds: dict[Literal["embedding", "matrix", "vector"], KindCodecConfig] | None = Field(
        None, description="DisTrO codec options for one kind of tensor only: embedding (token embeddings and the output "
        "head), matrix (the other weight matrices), vector (norms, biases); e.g. [optimizer.kinds.matrix] topk = 4.")
    momentum_warmup: bool = Field(True, description="Shorten DisTrO's momentum memory during the LR warmup (as Psyche does).")
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm (0 = off).")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward/backward on one device.")
    overlapped: bool = Field(True, description="Apply step t-1's results while training step t.")
    lookahead: bool = Field(True, description="Overlapped only: take step t's gradient on the weights with this node's own "
                            "step t-1 results applied (DisTrO.lookahead), not on weights one update behind.")

    def distro_options(self) -> dict[str, Any]:
        """The options this config sets for ``DisTrO.for_model`` (unset ones keep DisTrO's defaults)."""
        keys = ("compression_decay", "chunk", "topk", "one_bit", "weight_decay", "embedding_lr_scale",
                "matrix_lr_scale", "vector_lr_scale", "matrix_update", "embedding_update")
        options = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.kinds:
            options["kinds"] = {kind: c.model_dump(exclude_none=True) for kind, c in self.kinds.items()}
        return options


class RunConfig(_Section):
    """The whole run: what ``psyche server``/``psyche demo`` read and clients receive."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    coordinator: CoordinatorConfig = CoordinatorConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lr: LRScheduleConfig = LRScheduleConfig()
    optimizer: OptimizerConfig = OptimizerConfig()

    # The folder of the TOML file this config was read from; None when it came from
    # elsewhere (a server, a dict). Not a field: it stays out of model_dump() and so out of
    # digest(), which server, chain and clients compare wherever each keeps its copy.
    _source_dir: Path | None = PrivateAttr(None)

    @property
    def source_dir(self) -> Path | None:
        """The absolute folder of the config file this was read from by :func:`load_config`,
        or ``None`` for a config built from a dict (e.g. received from a server)."""
        return self._source_dir

    def local_path(self, value: str) -> str:
        """A path written in this config, as this process must open it.

        A relative path read from a config file is relative to that file's folder (so
        ``psyche train --config ../mine.toml`` opens what ``../mine.toml`` names); one in a
        config without a file stays relative to the current folder. Absolute paths and
        URLs (anything with ``://``) come back unchanged.

        >>> cfg = parse_config({"name": "x"})
        >>> cfg._source_dir = Path("/runs/cfg")
        >>> cfg.local_path("../data/fortunes"), cfg.local_path("https://h/d")
        ('/runs/data/fortunes', 'https://h/d')
        """
        if self._source_dir is None or "://" in value or Path(value).is_absolute():
            return value
        return os.path.normpath(self._source_dir / value)

    def data_location(self) -> str:
        """``data.location`` as this process opens it: a folder written in a config file is
        relative to that file (:meth:`local_path`); the default ``data/fortunes``, when the
        file does not set one, is relative to the current folder, where ``psyche tokenize``
        writes it by default and where clients of a server look for it."""
        if "location" not in self.data.model_fields_set:
            return self.data.location
        return self.local_path(self.data.location)

    @property
    def run_id(self) -> str:
        """The run's id: its name (unique per coordinator)."""
        return self.name

    def digest(self) -> str:
        """A stable hex digest of the config, so peers can check they train the same run."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class ConfigProblem:
    """One violated rule: ``field`` is the dotted path, ``message`` the rule."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ConfigError(ValueError):
    """A run config broke one or more rules; ``problems`` lists every one.

    ``source`` names where the config came from (its file, ``--data``, or the server
    that sent it). :meth:`lines` is the one way a config error is shown to a user.
    """

    def __init__(self, problems: list[ConfigProblem], source: str = "run config"):
        if not problems:
            raise ValueError("a ConfigError needs at least one problem")
        self.problems = problems
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """One line per problem: ``SOURCE: field: rule``.

        >>> ConfigError([ConfigProblem("lr.final_lr", "final_lr must be <= peak_lr")], "run.toml").lines()
        ['run.toml: lr.final_lr: final_lr must be <= peak_lr']
        """
        return [f"{self.source}: {p}" for p in self.problems]


def rule_violations(cfg: RunConfig) -> list[ConfigProblem]:
    """Cross-field rules, checked after every field passed its own checks."""
    c = cfg.coordinator
    out: list[ConfigProblem] = []

    def rule(ok: bool, field: str, message: str) -> None:
        if not ok:
            out.append(ConfigProblem(field, message))

    rule(c.warmup_time < c.epoch_time, "coordinator.warmup_time", f"warmup_time must be < epoch_time ({c.warmup_time} >= {c.epoch_time})")
    rule(c.warmup_time + c.cooldown_time < c.epoch_time, "coordinator.epoch_time",
         f"epoch_time must be > warmup_time + cooldown_time ({c.epoch_time} <= {c.warmup_time + c.cooldown_time})")
    rule(c.max_round_train_time + c.round_witness_time <= c.epoch_time, "coordinator.max_round_train_time",
         "max_round_train_time + round_witness_time must be <= epoch_time")
    rule(c.min_clients <= c.init_min_clients, "coordinator.min_clients",
         f"min_clients must be <= init_min_clients ({c.min_clients} > {c.init_min_clients})")
    rule(c.init_min_clients <= 256, "coordinator.init_min_clients",
         f"init_min_clients must be <= 256, the most clients in one epoch (got {c.init_min_clients})")
    rule(c.witness_nodes <= c.min_clients, "coordinator.witness_nodes",
         f"witness_nodes must be <= min_clients ({c.witness_nodes} > {c.min_clients})")
    rule(c.witness_nodes <= 32, "coordinator.witness_nodes", "witness_nodes must be <= 32")
    rule(c.global_batch_size_start <= c.global_batch_size_end, "coordinator.global_batch_size_start",
         "global_batch_size_start must be <= global_batch_size_end")
    rule(c.global_batch_size_start >= c.init_min_clients, "coordinator.global_batch_size_start",
         f"global_batch_size_start must be >= init_min_clients so every trainer gets a sample ({c.global_batch_size_start} < {c.init_min_clients})")
    rule(c.checkpointers <= c.min_clients, "coordinator.checkpointers", "checkpointers must be <= min_clients")
    m = cfg.model
    rule(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
         "hidden_size must be divisible by num_attention_heads")
    rule(m.num_attention_heads % m.num_key_value_heads == 0, "model.num_key_value_heads",
         "num_attention_heads must be divisible by num_key_value_heads")
    lr = cfg.lr
    rule(lr.final_lr <= lr.peak_lr, "lr.final_lr", "final_lr must be <= peak_lr")
    rule(lr.warmup_steps < c.total_steps, "lr.warmup_steps", "warmup_steps must be < coordinator.total_steps")
    return out


# The tables of a run config ([coordinator], [model], ...), as opposed to its plain fields.
_SECTIONS = {name for name, f in RunConfig.model_fields.items()
             if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The config section (model class) that holds the field at ``loc``, if any."""
    section: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        section = field.annotation
    return section


def unknown_field_message(loc: tuple) -> str:
    """What to say about the unknown field at ``loc``: the closest known name if one is
    near (``did you mean `total_steps`?``), else the known names of its section.

    >>> unknown_field_message(("coordinator", "total_step"))
    'unknown field; did you mean `total_steps`?'
    >>> unknown_field_message(("cordinator",))
    'unknown section; did you mean [coordinator]?'
    """
    section = _section_at(loc)
    if section is None:
        return "unknown field"
    known = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    is_section = bool(close) and section is RunConfig and close[0] in _SECTIONS
    kind = "section" if is_section else "field"
    if close:
        return f"unknown {kind}; did you mean " + (f"[{close[0]}]?" if is_section else f"`{close[0]}`?")
    where = "" if section is RunConfig else f" of [{'.'.join(map(str, loc[:-1]))}]"
    return f"unknown field; the known fields{where} are: {', '.join(known)}"


def _pydantic_problems(exc: ValidationError) -> list[ConfigProblem]:
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = unknown_field_message(tuple(err["loc"]))
        elif "input" in err and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        out.append(ConfigProblem(field, msg))
    return out


def parse_config(data: dict[str, Any], source: str = "run config") -> RunConfig:
    """Build a :class:`RunConfig` from a dict, or raise :class:`ConfigError` listing every problem."""
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(exc), source) from None
    problems = rule_violations(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run config, or raise :class:`ConfigError` listing every problem.

    The file's folder is kept as :attr:`RunConfig.source_dir` (outside the digest), so a
    relative ``data.location`` is opened relative to the file (:meth:`RunConfig.local_path`),
    wherever the command runs."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([ConfigProblem("<file>", f"cannot read {path}: {exc.strerror}")], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("<toml>", str(exc))], str(path)) from None
    cfg = parse_config(data, str(path))
    cfg._source_dir = Path(os.path.abspath(path.parent))
    return cfg
