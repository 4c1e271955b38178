"""Fuzzing the HTTP surfaces against their OpenAPI schemas with schemathesis (issue 17, "Fuzz every surface").

Two apps, in process (schemathesis' ASGI transport: no sockets), each loaded from its own
``/openapi.json``: the coordinator server (``psyche.ledger.server.create_app``, its dashboard
mounted as ``psyche server`` does) hosting one run, and the data server
(``psyche.data.server.create_data_app``) over a small token folder. Every operation gets
``MAX_EXAMPLES`` cases generated from its schema (half of them aimed at the real run or split,
the other half at random names), and, where the schema has parameters to break, as many
negative ones; a request body (msgpack, declared without a schema) is either what
schemathesis generates, msgpack-encoded, or random bytes.

Checks on every response:

- ``not_a_server_error``: no 5xx;
- ``status_code_conformance``: only statuses the schema documents;
- ``content_type_conformance`` and ``response_headers_conformance``: as documented;
- ``response_schema_conformance``: JSON bodies against their models (the msgpack state and the
  raw token bytes are documented by content type only, so for them the content type is what
  is checked);
- ``negative_data_rejection``: a request that breaks the schema is refused with a 4xx.

Left out: ``positive_data_acceptance``. The instruction and report bodies are signed msgpack
envelopes, which a JSON schema cannot describe, so they are declared without one and every
generated body counts as valid, while the server rightly refuses unsigned bytes with 400.

Beyond the schema, for the coordinator: the run's state digest, its instruction log and its
stored reports do not change (unsigned bytes apply nothing), what the server counts stays
bounded, and the process's resident memory grows by less than 64 MiB over all the cases
(tracemalloc, as the decoders' test uses, would slow schemathesis five times over).
Mutations of valid signed requests (the same mutations as tests/test_fuzz_decoders.py) are
posted too: a mutation that still opens can only be a request its signer signed.

Each run prints one line with its number of cases, its statuses and its failures (``pytest -s``).
Fixed seeds (``derandomize``): a failure reproduces as is. ``PSYCHE_FULL=1``: four times the cases.
"""

from __future__ import annotations

import gc
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from psyche.config import parse_config
from psyche.coordinator import Join, Tick, encode_instruction
from psyche.dashboard import mount_dashboard
from psyche.data import tokenize_corpus
from psyche.data.server import create_data_app
from psyche.identity import Identity
from psyche.ledger.envelope import SignedRequest, open_request, sign_request
from psyche.ledger.server import CoordinatorServer, create_app, open_server
from tests.fuzzing import fuzzed

MAX_EXAMPLES = 160 if os.environ.get("PSYCHE_FULL") == "1" else 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]

CFG = parse_config({
    "name": "fuzz-http",
    "coordinator": {"init_min_clients": 2, "min_clients": 1, "witness_nodes": 1, "total_steps": 5,
                    "global_batch_size_start": 4, "global_batch_size_end": 4, "checkpointers": 1},
    "lr": {"warmup_steps": 1},
})


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx: schemathesis.SerializationContext, value: object) -> bytes:
    """A generated body as msgpack (random bytes, drawn beside it, go out as they are; an integer
    msgpack cannot hold goes out as the value's JSON text, garbage all the same)."""
    if isinstance(value, bytes):
        return value
    try:
        return msgspec.msgpack.encode(value)
    except OverflowError:
        return json.dumps(value).encode()


@dataclass
class Tally:
    """What one schemathesis run did."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    operations: int = 0

    def line(self, name: str) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return (f"schemathesis {name}: {self.cases} cases over {self.operations} operations "
                f"(statuses {statuses}), {len(self.failures)} failures")


def load_schema(app: FastAPI) -> schemathesis.BaseSchema:
    """``app``'s own ``/openapi.json``, served in process (this starts the app's lifespan)."""
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def fuzz_app(schema: schemathesis.BaseSchema, real: dict[str, str], *, max_examples: int = MAX_EXAMPLES) -> Tally:
    """Every operation of ``schema``, positive and negative, with :data:`CHECKS`.

    ``real``: path parameters that name something the app holds (half the cases use them).
    Failures are collected rather than raised, so one run reports them all.
    """
    tally = Tally()
    for result in schema.get_all_operations():
        op = result.ok()
        tally.operations += 1
        fixed = {p.name: real[p.name] for p in op.path_parameters if p.name in real}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases = op.as_strategy(generation_mode=mode)
            if fixed:
                cases = st.one_of(cases, op.as_strategy(generation_mode=mode, path_parameters=fixed))
            raw_bodies = st.one_of(st.none(), st.binary(max_size=400)) if op.body else st.none()

            @settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=cases, raw=raw_bodies)
            def run(case: schemathesis.Case, raw: bytes | None) -> None:
                if raw is not None:
                    case.body = raw
                tally.cases += 1
                try:
                    response = case.call()
                    tally.statuses[response.status_code] += 1
                    case.validate_response(response, checks=CHECKS)
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 — every failure is tallied
                    tally.failures.append(f"{op.label} ({mode.value}): {exc}")

            try:
                run()
            except Unsatisfiable:
                # Nothing to break: every string is a valid run id, bodies have no schema, and
                # operations without parameters have no negative form.
                assert mode is GenerationMode.NEGATIVE
    return tally


# --- the coordinator server -------------------------------------------------------------------


@dataclass
class Hosted:
    server: CoordinatorServer
    app: FastAPI

    def fingerprint(self) -> tuple[str, int, int, int]:
        """The run's state digest, its log length, its stored reports, and how many kinds of refusal are counted."""
        host = self.server.hosts[CFG.run_id]
        store = self.server.store
        return (host.coordinator.digest(), len(store.log(CFG.run_id)), len(store.reports(CFG.run_id)),
                len(self.server.rejected))


@pytest.fixture
def hosted(tmp_path: Path) -> Iterator[Hosted]:
    # A clock that ticks once at start and then not within the test: the digest may only change by a request.
    server = open_server(CFG, tmp_path / "run.sqlite", authority=Identity.generate().public_key, tick_interval=3600)
    yield Hosted(server, create_app(server, extra_routes=mount_dashboard))
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # schemathesis keeps each app's lifespan (our clock) until the process exits
    server.store.close()


def _resident_bytes() -> int:
    """This process's resident memory now (Linux), after a garbage collection."""
    gc.collect()
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_coordinator_server_answers_fuzzed_requests_as_documented_and_applies_nothing(hosted: Hosted):
    schema = load_schema(hosted.app)
    real = {"run_id": CFG.run_id}
    fuzz_app(schema, real, max_examples=1)  # the clock's first tick is behind us, caches are filled
    before, memory = hosted.fingerprint(), _resident_bytes()
    tally = fuzz_app(schema, real)
    grown = _resident_bytes() - memory
    print(tally.line("coordinator server") + f"; resident memory {grown / 2**20:+.1f} MiB")
    assert not tally.failures, "\n\n".join(tally.failures[:5])
    assert tally.cases >= 3 * MAX_EXAMPLES and {200, 400, 404} <= set(tally.statuses)
    # Unsigned bytes apply nothing, store nothing, and add no new kinds of counter.
    assert hosted.fingerprint()[:3] == before[:3]
    assert hosted.fingerprint()[3] <= 8
    # Memory stays where it was (a leak per request, or a body held whole, would show here;
    # hypothesis' and schemathesis' own bookkeeping is in it too).
    assert grown < 64 << 20


SIGNER = Identity(bytes(range(32)))


@pytest.fixture
def client(hosted: Hosted) -> Iterator[TestClient]:
    with TestClient(hosted.app) as c:
        yield c


def _signed() -> list[bytes]:
    join = encode_instruction(Join(p2p_address="fuzz"))
    return [
        sign_request(SIGNER, CFG.run_id, "instruction", join, nonce=1_000),
        sign_request(SIGNER, CFG.run_id, "instruction", encode_instruction(Tick()), nonce=2_000),
        sign_request(SIGNER, CFG.run_id, "report", json.dumps({"step": 1, "loss": 2.0}).encode(), nonce=3_000),
    ]


SIGNED = _signed()


@settings(max_examples=4 * MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_signed_requests_apply_only_what_was_signed(hosted: Hosted, client: TestClient, data: st.DataObject):
    before = hosted.fingerprint()
    _, raw = fuzzed(data, SIGNED)
    path = data.draw(st.sampled_from(["instructions", "reports"]), label="path")
    response = client.post(f"/api/runs/{CFG.run_id}/{path}", content=raw,
                           headers={"content-type": "application/msgpack"})
    assert response.status_code < 500, response.text
    assert set(response.json()) >= {"error", "message"} if response.status_code >= 400 else response.json()["ok"]
    if hosted.fingerprint()[:3] != before[:3]:
        # Something was applied or stored: only a request its signer signed opens.
        kind = "instruction" if path == "instructions" else "report"
        opened = open_request(raw, run_id=CFG.run_id, kind=kind)
        assert response.status_code == 200
        assert opened in [msgspec.msgpack.decode(s, type=SignedRequest) for s in SIGNED]


@pytest.mark.parametrize(("path", "body", "message"), [
    # A nonce the host cannot store (SQLite's INTEGER is 64-bit signed): it was applied to the
    # coordinator in memory, then the write failed with 500 and memory and database disagreed.
    ("instructions", sign_request(SIGNER, CFG.run_id, "instruction", encode_instruction(Join(p2p_address="x")),
                                  nonce=2**63), "nonce"),
    # A report nested deeper than the JSON parser goes (RecursionError: 500), from any key.
    ("reports", sign_request(SIGNER, CFG.run_id, "report", b"[" * 5000, nonce=5), "nested"),
    # A report's step no 64-bit integer holds (the store's write failed: 500).
    ("reports", sign_request(SIGNER, CFG.run_id, "report", b'{"step": 1' + b"0" * 30 + b"}", nonce=6), "step"),
])
def test_signed_requests_the_host_cannot_store_are_refused_before_anything_changes(hosted: Hosted, client: TestClient,
                                                                                     path: str, body: bytes, message: str):
    before = hosted.fingerprint()
    response = client.post(f"/api/runs/{CFG.run_id}/{path}", content=body, headers={"content-type": "application/msgpack"})
    assert response.status_code == 400 and message in response.json()["message"]
    assert hosted.fingerprint()[:3] == before[:3]


# --- the data server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-data")
    corpus = root / "corpus.txt"
    corpus.write_text("\n%\n".join(f"Fortune {i}: the {['owl', 'fox', 'cat'][i % 3]} saves {i} pennies." for i in range(300)))
    tokenize_corpus(corpus=[corpus], vocab_size=300, out_dir=root / "tokens", progress=False)
    return root / "tokens"


def test_data_server_answers_fuzzed_requests_as_documented(token_folder: Path):
    app = create_data_app(token_folder)
    try:
        tally = fuzz_app(load_schema(app), {"split": "train", "name": "train.bin"})
    finally:
        from schemathesis.python import asgi

        asgi.shutdown_lifespans()
    print(tally.line("data server"))
    assert not tally.failures, "\n\n".join(tally.failures[:5])
    assert tally.cases >= 3 * MAX_EXAMPLES and {200, 400, 404, 416, 422} <= set(tally.statuses)
