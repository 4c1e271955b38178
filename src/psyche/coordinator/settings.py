"""The coordinator's own copy of the run settings, so its state serialises standalone.

:class:`CoordinatorSettings` mirrors ``psyche.config.CoordinatorConfig`` field for
field (plus ``seq_len`` from the model section, needed to count tokens). The
pydantic config is validated once when a run config is loaded; the coordinator
re-checks the rules it depends on (:func:`settings_problems`) because its state
can also come from bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from psyche.coordinator.verification import MAX_VERIFIERS

MAX_CLIENTS = 256
"""Most clients in one epoch (as the original's Solana account)."""
MAX_WITNESSES = 32
"""Most witnesses in one round; ``witness_nodes = 0`` means every client up to this."""
SHARE_RULES = ("speed", "even")
"""The values of ``CoordinatorSettings.shares``."""
ACCESS_RULES = ("open", "gated")
"""The values of ``CoordinatorSettings.access``."""
MAX_ACCOUNTS = 1024
"""Most client accounts (anyone who ever joined) a run keeps, with their points."""


class CoordinatorSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Timing, membership and batch-size rules. Times are whole seconds."""

    warmup_time: int = 30
    cooldown_time: int = 10
    max_round_train_time: int = 30
    round_witness_time: int = 5
    epoch_time: int = 600
    total_steps: int = 100
    init_min_clients: int = 1
    min_clients: int = 1
    witness_nodes: int = 0
    global_batch_size_start: int = 16
    global_batch_size_end: int = 16
    global_batch_size_warmup_tokens: int = 0
    waiting_for_members_extra_time: int = 3
    cold_start_warmup_steps: int = 0
    epoch_reward: int = 1000
    checkpointers: int = 1
    shares: str = "speed"
    """How a round's batch is cut: ``"speed"`` in proportion to measured throughput, ``"even"`` equally."""
    verifiers: int = 3
    """Witnesses that check each result against its trainer's data (0: results are not checked)."""
    access: str = "open"
    """Who may join: ``"open"`` any key, ``"gated"`` only keys the authority (or an authorizer) granted."""
    seq_len: int = 128
    """Tokens per sample: the batch-size ramp counts tokens = samples * seq_len."""

    @classmethod
    def from_config(cls, cfg: Any, *, seq_len: int | None = None) -> CoordinatorSettings:
        """Mirror a ``CoordinatorConfig`` (or a whole ``RunConfig``) into settings.

        A ``RunConfig`` supplies ``seq_len`` from its model section; with a bare
        ``CoordinatorConfig`` pass ``seq_len`` or get the model config's default.
        Duck-typed so this package does not import pydantic.
        """
        if hasattr(cfg, "coordinator") and hasattr(cfg, "model"):
            if seq_len is None:
                seq_len = cfg.model.seq_len
            cfg = cfg.coordinator
        if seq_len is None:
            from psyche.config import ModelConfig  # only reached when handed a pydantic config

            seq_len = ModelConfig.model_fields["seq_len"].default
        fields = {name: getattr(cfg, name) for name in cls.__struct_fields__ if name != "seq_len"}
        return cls(**fields, seq_len=seq_len)

    def witness_count(self, members: int) -> int:
        """How many witnesses a round (or warmup) of ``members`` clients selects."""
        wanted = self.witness_nodes if self.witness_nodes > 0 else MAX_WITNESSES
        return max(0, min(wanted, members, MAX_WITNESSES))

    def batch_size_at(self, tokens_before: int) -> int:
        """Global batch size (samples) of a step that starts after ``tokens_before`` tokens.

        Linear ramp from ``global_batch_size_start`` to ``_end`` over
        ``global_batch_size_warmup_tokens``, rounded half up; integer arithmetic so
        every machine agrees.
        """
        start, end, ramp = self.global_batch_size_start, self.global_batch_size_end, self.global_batch_size_warmup_tokens
        if tokens_before >= ramp:
            return end
        # start + (end - start) * tokens / ramp, rounded half up
        return start + (2 * (end - start) * tokens_before + ramp) // (2 * ramp)


def settings_problems(s: CoordinatorSettings) -> list[str]:
    """Every rule the settings break, one line each naming the field (empty = usable)."""
    out: list[str] = []

    def rule(ok: bool, message: str) -> None:
        if not ok:
            out.append(message)

    for name in ("warmup_time", "cooldown_time", "max_round_train_time", "round_witness_time", "epoch_time",
                 "total_steps", "init_min_clients", "min_clients", "global_batch_size_start",
                 "global_batch_size_end", "seq_len"):
        rule(getattr(s, name) > 0, f"{name} must be > 0 (got {getattr(s, name)})")
    for name in ("witness_nodes", "global_batch_size_warmup_tokens", "waiting_for_members_extra_time",
                 "cold_start_warmup_steps", "epoch_reward", "checkpointers"):
        rule(getattr(s, name) >= 0, f"{name} must be >= 0 (got {getattr(s, name)})")
    rule(s.warmup_time < s.epoch_time, f"warmup_time must be < epoch_time ({s.warmup_time} >= {s.epoch_time})")
    rule(s.min_clients <= s.init_min_clients, f"min_clients must be <= init_min_clients ({s.min_clients} > {s.init_min_clients})")
    rule(s.init_min_clients <= MAX_CLIENTS, f"init_min_clients must be <= {MAX_CLIENTS} (got {s.init_min_clients})")
    rule(s.witness_nodes <= s.min_clients, f"witness_nodes must be <= min_clients ({s.witness_nodes} > {s.min_clients})")
    rule(s.witness_nodes <= MAX_WITNESSES, f"witness_nodes must be <= {MAX_WITNESSES} (got {s.witness_nodes})")
    rule(s.global_batch_size_start <= s.global_batch_size_end,
         "global_batch_size_start must be <= global_batch_size_end")
    rule(s.shares in SHARE_RULES, f"shares must be one of {', '.join(SHARE_RULES)} (got {s.shares!r})")
    rule(s.access in ACCESS_RULES, f"access must be one of {', '.join(ACCESS_RULES)} (got {s.access!r})")
    rule(0 <= s.verifiers <= MAX_VERIFIERS, f"verifiers must be in 0..{MAX_VERIFIERS} (got {s.verifiers})")
    rule(s.checkpointers <= s.min_clients, f"checkpointers must be <= min_clients ({s.checkpointers} > {s.min_clients})")
    return out
