"""Who may join a run, and who gets in when more keys ask than a run should take (pure).

Two kinds of run (``CoordinatorSettings.access``):

- **open**: any key may Join. Keys cost nothing to make, so the rules below keep a flood of
  fresh keys from locking anyone out: it can neither evict a member nor fill the run.
- **gated**: only keys holding a live :class:`~psyche.coordinator.state.Grant` may Join (the
  authority always may). The authority grants and revokes (``Authorize``/``Revoke``), or
  delegates to authorizer keys (``Delegate``) that sign grants for a term no longer than
  their own. The rule lives here, in the coordinator, so the embedded, server and Solana
  hosts all enforce it the same way.

Under load, for both kinds:

1. **A member already training is never displaced**: the next epoch takes the current
   epoch's Healthy members first (up to ``MAX_CLIENTS``, as always).
2. **Joiners wait in a bounded list** (``MAX_PENDING``). A join when it is full evicts the
   oldest waiting key that never earned points; if every waiting key has earned points, the
   join is refused (``RunFull``), the one refusal a flood of fresh keys cannot cause.
3. **A join is good for the next epoch only**: keys the next epoch does not admit are
   dropped from the list and join again (clients do so by themselves). So a waiting list
   a flood filled empties within one epoch.
4. **Fresh keys enter in bounded numbers**: after the members carried over and the waiting
   keys that earned points before (in join order), an epoch admits keys that never earned
   points, newest join first, at most ``max(MIN_NEWCOMERS, init_min_clients, the others)``.
   A run can thus at most double per epoch once it is past ``MIN_NEWCOMERS``; fresh keys that
   never train are dropped by the usual health checks, and the newest join (say a newcomer
   after a flood) is admitted first.
5. **Accounts are recycled**: when the run holds ``MAX_ACCOUNTS`` accounts, a new key takes
   the place of the account idle longest that never earned points and is neither a member
   nor waiting. Accounts with points (contributors' rewards) are never recycled.
"""

from __future__ import annotations

from psyche.coordinator.settings import MAX_ACCOUNTS, MAX_CLIENTS
from psyche.coordinator.state import Client, CoordinatorState, Grant

MAX_PENDING = MAX_CLIENTS
"""Most keys waiting to join the next epoch."""
MAX_GRANTS = MAX_ACCOUNTS
"""Most join grants a gated run holds (expired ones make room)."""
MAX_AUTHORIZERS = 16
"""Most keys the authority may delegate granting to."""
MIN_NEWCOMERS = 16
"""Keys that never earned points an epoch always admits (if there is room), whatever the run's size."""


def gated(state: CoordinatorState) -> bool:
    """Whether only granted keys may join this run."""
    return state.settings.access == "gated"


def live(grants: list[Grant], key: bytes, now: int) -> Grant | None:
    """``key``'s grant in ``grants`` if it holds at unix second ``now``, else None."""
    for g in grants:
        if g.key == key:
            return g if g.expires_at == 0 or now < g.expires_at else None
    return None


def may_join(state: CoordinatorState, key: bytes, now: int) -> bool:
    """Whether ``key`` may join at ``now``: any key in an open run; in a gated one the
    authority and keys holding a live grant."""
    return not gated(state) or key == state.authority or live(state.grants, key, now) is not None


def earners(state: CoordinatorState) -> set[bytes]:
    """The keys whose accounts hold reward points: they trained and were accepted in some epoch."""
    return {a.id for a in state.accounts if a.points > 0}


def pending_to_evict(state: CoordinatorState) -> int | None:
    """Index in ``state.pending`` of the key a join evicts when the list is full: the oldest
    one that never earned points (None: all have, and the join must be refused)."""
    with_points = earners(state)
    for i, key in enumerate(state.pending):
        if key not in with_points and key != state.authority:
            return i
    return None


def account_to_recycle(state: CoordinatorState) -> int | None:
    """Index in ``state.accounts`` of the account a new key replaces when the run holds
    ``MAX_ACCOUNTS``: the one idle longest that never earned points and is neither a member
    of this epoch nor waiting (None: none may go)."""
    busy = {c.id for c in state.clients} | set(state.pending) | {state.authority}
    best: tuple[int, int] | None = None
    for i, a in enumerate(state.accounts):
        if a.points == 0 and a.id not in busy and (best is None or a.joined_at < best[0]):
            best = (a.joined_at, i)
    return None if best is None else best[1]


def admitted(state: CoordinatorState, carried: list[Client], now: int) -> list[bytes]:
    """The waiting keys the next epoch admits beside ``carried`` (rules 1, 3 and 4 above), in
    join order. In a gated run a key whose grant lapsed while it waited is not admitted."""
    room = MAX_CLIENTS - len(carried)
    eligible = [k for k in state.pending if may_join(state, k, now)]
    with_points = earners(state)
    proven = [k for k in eligible if k in with_points][:room]
    fresh_cap = max(MIN_NEWCOMERS, state.settings.init_min_clients, len(carried) + len(proven))
    fresh_room = min(room - len(proven), fresh_cap)
    fresh = [k for k in reversed(eligible) if k not in with_points][:max(0, fresh_room)]
    chosen = set(proven) | set(fresh)
    return [k for k in state.pending if k in chosen]


def grant(grants: list[Grant], key: bytes, expires_at: int, now: int, limit: int) -> bool:
    """Set ``key``'s term in ``grants`` (adding it, after dropping lapsed grants if the list is
    at ``limit``); False if there is no room, and then ``grants`` is unchanged."""
    for g in grants:
        if g.key == key:
            g.expires_at = expires_at
            return True
    if len(grants) >= limit:
        kept = [g for g in grants if g.expires_at == 0 or now < g.expires_at]
        if len(kept) >= limit:
            return False
        grants[:] = kept
    grants.append(Grant(key=key, expires_at=expires_at))
    return True


def remove(grants: list[Grant], key: bytes) -> bool:
    """Drop ``key``'s entry from ``grants``; whether it had one."""
    for i, g in enumerate(grants):
        if g.key == key:
            del grants[i]
            return True
    return False

