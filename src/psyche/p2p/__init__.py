"""Peer-to-peer layer: signed broadcast, verified blob transfer and model sharing over iroh.

Public API::

    ident = Identity.load_or_create(path)               # psyche.identity: ed25519 key, file mode 0600
    node = await P2PNode.start(ident, run_id, bind="127.0.0.1:0")   # iroh QUIC by default
    node.address                                         # ticket string for the coordinator Join
    node.set_members({pubkey: address, ...}); node.set_step(step)
    await node.broadcast(ResultCommitment(...) | Finished(...) | Heartbeat(...))
    node.on_message(cb) / async for sender, msg in node.messages()
    h = node.publish_blob(data); data = await node.fetch_blob(h, size, providers)
    node.serve_model(provider); model = await node.fetch_model(providers, manifest_digest=..., into=sink)
    node.set_upload_rate(2e6); node.set_download_rate(None)   # bytes/s caps, results and model parts together
    node.stats(); node.counters; await node.close()

Module map: :mod:`~psyche.p2p.wire` (messages, envelopes, frames),
:mod:`~psyche.p2p.gossip` (sans-io broadcast), :mod:`~psyche.p2p.blobs`
(sans-io store and checks), :mod:`~psyche.p2p.model` (manifests, trust rule, sinks),
:mod:`~psyche.p2p.ratelimit` (bandwidth caps),
:mod:`~psyche.p2p.transport` (the seam and an in-memory network),
:mod:`~psyche.p2p.iroh_transport`, :mod:`~psyche.p2p.node` (asyncio),
:mod:`~psyche.p2p.torch_io` (torch conversion, fetching into a model in place; the one module
here that imports torch). A node in its own process, driven over stdin/stdout for tests and
benchmarks, is :mod:`psyche.testing.p2p_worker`.
"""

from psyche.p2p.blobs import BlobStore
from psyche.p2p.errors import BlobUnavailable, ModelMismatch, ModelUnavailable, NotAMember, P2PError, TransportError
from psyche.p2p.gossip import DROP_REASONS
from psyche.p2p.model import (
    FetchedModel,
    InMemoryModel,
    Manifest,
    MemorySink,
    ModelProvider,
    ModelSink,
    RawTensor,
    build_manifest,
)
from psyche.p2p.node import P2PNode
from psyche.p2p.ratelimit import RateLimit, parse_rate
from psyche.p2p.stats import PeerStats
from psyche.p2p.transport import MemoryNetwork, Transport
from psyche.p2p.wire import ALPN, WIRE_VERSION, Finished, Heartbeat, Message, ResultCommitment, SignedMessage, content_hash

__all__ = [
    "ALPN", "WIRE_VERSION", "DROP_REASONS",
    "P2PNode", "Transport", "MemoryNetwork",
    "ResultCommitment", "Finished", "Heartbeat", "Message", "SignedMessage", "content_hash",
    "BlobStore", "PeerStats",
    "Manifest", "ModelProvider", "InMemoryModel", "RawTensor", "FetchedModel", "build_manifest",
    "ModelSink", "MemorySink", "ModelMismatch", "RateLimit", "parse_rate",
    "P2PError", "TransportError", "NotAMember", "BlobUnavailable", "ModelUnavailable",
]
