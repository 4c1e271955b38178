"""What the client runtime needs of its collaborators, as typed ports.

:class:`~psyche.client.runtime.ClientRuntime` follows the coordinator through a
:class:`~psyche.ledger.base.Ledger`; everything else it drives is named here by
what it uses, not by the class that happens to provide it:

- :class:`Trainer`: the torch half (model, DisTrO, data); :class:`psyche.client.trainer.LocalTrainer`.
- :class:`Node`: the P2P node (membership, gossip, blobs, model sharing); :class:`psyche.p2p.P2PNode`.
- :class:`NodeIdentity`: whose key this node signs with; :class:`psyche.identity.Identity`.

The ports are structural (``typing.Protocol``): the real classes do not inherit
from them, and ``mypy`` checks that they fit wherever a runtime is built.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # types only: this module imports neither torch nor the transport
    import torch

    from psyche.client.timing import PhaseTimer
    from psyche.client.trainer import TrainOutput
    from psyche.config import RunConfig
    from psyche.distro.verify import Reference
    from psyche.p2p import Message
    from psyche.p2p.model import FetchedModel, ModelProvider, ModelSink
    from psyche.p2p.stats import PeerStats
    from psyche.p2p.torch_io import StateDictSink


class TrainerFailure(Exception):
    """The trainer could not do this step and the node must leave the epoch: its weights are
    those of the last step it applied, but its part of the round is lost (a node's rank died).
    ``fatal``: it cannot train again in this process either (the client stops, after withdrawing)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class Trainer(Protocol):
    """One node's model and optimizer: trains intervals, applies agreed results, saves.

    Blocking methods (``prepare``, ``train``, ``apply``, ``evaluate``, ``save``) are called from a
    worker thread, one at a time.
    """

    cfg: RunConfig
    """The run's config (the runtime reads ``optimizer.overlapped`` and ``coordinator.total_steps``)."""
    lr_window: tuple[int, int] | None
    """Steps ``[start, end)`` of the cold-start LR ramp; set by the runtime at each warmup."""
    timer: PhaseTimer
    """Seconds spent per kind of work, for ``psyche client --profile``."""
    ranks: int
    """Processes (one per device) that train each step of this node (reported to the run)."""

    @property
    def ready(self) -> bool:
        """Whether a model is loaded."""
        ...

    def init_model(self) -> None:
        """Build the epoch-0 model (from the run's seed or its configured checkpoint)."""
        ...

    def load_checkpoint_folder(self, path: str | Path) -> None:
        """Load the weights of a ``save_pretrained`` folder."""
        ...

    async def fetch_from_peers(self, fetch: Callable[[StateDictSink], Awaitable[FetchedModel]]) -> FetchedModel:
        """Install the weights ``fetch(sink)`` writes; raises what ``fetch`` raises
        (:class:`~psyche.p2p.ModelUnavailable`, :class:`~psyche.p2p.ModelMismatch`)."""
        ...

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights (what peers fetch)."""
        ...

    def weights_digest(self) -> str:
        """sha256 (hex) of the weights; equal on nodes holding bit-identical weights."""
        ...

    def parameters(self) -> int:
        """Number of parameters of the loaded model."""
        ...

    def prepare(self) -> None:
        """Get ready to train on the weights just installed (a node's ranks take them now, not
        at its first step). Raises :class:`TrainerFailure` as :meth:`train` does."""
        ...

    def train(self, step: int, start: int, end: int) -> TrainOutput:
        """Train samples ``[start, end)`` for ``step``; return the compressed result. Raises
        :class:`TrainerFailure` when the node cannot (its weights are then unchanged)."""
        ...

    def check_payload(self, payload: bytes) -> None:
        """Raise ``ValueError`` unless ``payload`` decodes to a result for our parameters."""
        ...

    def apply(self, step: int, payloads: list[bytes]) -> None:
        """Apply ``step``'s agreed results, in the order given."""
        ...

    def check_sequences(self, own_samples: int, checks: int) -> int:
        """Sequences of a checked trainer's batch each of ``checks`` references covers, for a
        node that trains ``own_samples`` this round."""
        ...

    def references(self, picks: list[list[int]]) -> list[Reference]:
        """The verification references of the training samples in each list of ``picks``, on the
        current weights."""
        ...

    def check_scores(self, checks: list[tuple[Reference, bytes]], results: dict[bytes, bytes]) -> list[float]:
        """Each ``(reference, trainer id)``'s verification score against the round's other
        ``results`` (trainer id -> payload); NaN where it cannot be scored."""
        ...

    def evaluate(self, part: tuple[int, int] = (0, 1)) -> tuple[float, int]:
        """Validation loss of the current weights on part ``part[0]`` of ``part[1]`` of the
        held-out samples, and the tokens that part holds (0 for an empty part)."""
        ...

    def save(self, out_dir: str | Path, *, step: int) -> tuple[Path, bytes]:
        """Write a checkpoint folder; return it and the sha256 of its weights."""
        ...


class Node(Protocol):
    """This node's place in the run's P2P network (see :class:`psyche.p2p.P2PNode`)."""

    @property
    def address(self) -> str:
        """Where peers reach this node (what a ``Join`` registers)."""
        ...

    @property
    def members(self) -> dict[bytes, str]:
        """The peers this node talks to: id -> address."""
        ...

    @property
    def upload_rate(self) -> float | None:
        """Upload limit in bytes per second (None: unlimited)."""
        ...

    @property
    def download_rate(self) -> float | None:
        """Download limit in bytes per second (None: unlimited)."""
        ...

    def set_members(self, members: dict[bytes, str]) -> None:
        """Replace the member set (the run's other clients)."""
        ...

    def set_step(self, step: int) -> None:
        """The run's current step (tags blobs, drops stale messages)."""
        ...

    def messages(self) -> AsyncIterator[tuple[bytes, Message]]:
        """Yield ``(sender, message)`` for every verified message from a member."""
        ...

    async def broadcast(self, msg: Message) -> bytes:
        """Sign and gossip ``msg`` to every member; return its content hash."""
        ...

    def publish_blob(self, data: bytes, *, step: int | None = None) -> bytes:
        """Serve ``data`` to members; return its hash."""
        ...

    async def fetch_blob(self, blob_hash: bytes, size: int, providers: list[bytes], *,
                         timeout: float = ...) -> bytes:
        """Download and verify a blob; raise :class:`~psyche.p2p.BlobUnavailable` after ``timeout``."""
        ...

    def drop_blobs_older_than(self, step: int) -> int:
        """Stop serving blobs of steps before ``step``; return how many went."""
        ...

    def serve_model(self, provider: ModelProvider | None) -> bytes | None:
        """Serve ``provider``'s model to members (None stops); return its manifest digest."""
        ...

    async def fetch_model(self, providers: list[bytes], *, into: ModelSink | None = None) -> FetchedModel:
        """Fetch a model from ``providers`` into ``into``; raise :class:`~psyche.p2p.ModelUnavailable`
        or :class:`~psyche.p2p.ModelMismatch`."""
        ...

    def stats(self) -> dict[bytes, PeerStats]:
        """Bytes and timings exchanged with each peer since this node started."""
        ...


class NodeIdentity(Protocol):
    """The key this node signs with."""

    @property
    def public_key(self) -> bytes:
        """32-byte ed25519 public key: the node's id in the run and on the P2P network."""
        ...
