"""Decisions: Casbin decides, ``when`` conditions feed it, a cache keeps it cheap.

How a condition reaches Casbin. Casbin's own matcher evaluation has no
"unknown": a missing attribute is an error or false, and false on a deny rule
would open a door. So the matcher ends with ``cond(p.id, r.env)``, and ``r.env``
is an ``Evaluation`` for this request. Casbin only calls ``cond`` for rows whose
role, model pattern and action already matched (the matcher short-circuits),
so a rule's condition is evaluated lazily, at most once per request, and only
when it could matter. ``cond`` maps three-valued outcomes to a row match:
an allow row matches only when its condition is TRUE; a deny row matches unless
its condition is FALSE (a missing claim never opens a door).

Which rule decided. Deny rows come first and Casbin stops at the first matching
deny, whose row (with the rule id column) ``enforce_ex`` returns. When Casbin
allows, the first allow whose ``cond`` matched is the deciding rule (noted by
``cond`` as Casbin visits the rows; pycasbin 2 also names an allow row in its
explain, not always that one, so it is not used). Otherwise: ``default-deny``.

Shadow rules live in a second enforcer that only observes: there ``cond``
notes each matching shadow rule and answers false, so Casbin visits every row.
A matching shadow deny would deny; a matching shadow allow would allow unless an
enforced deny decided.

The decision cache. Evaluation is deterministic in what it reads: every
attribute read is recorded (``Facts.reads``) with a value token, and two
requests with the same effective roles, model and action, and the same tokens
at the same paths, evaluate identically. So a decision is cached under
(roles, model, action) + the paths it read + their tokens, and found again by
re-reading those paths. Decisions that read any ``request.*`` attribute are not
cached. Each compiled policy gets a fresh cache: a reload invalidates it.
The cache is an ``Lru`` (an evaluation is the expensive thing it saves); the
read-sets per base are a ``ClearWhenFull`` (cheap to relearn).

In front of that cache sits a memo (``decide_for``) keyed by the identity's
``cache_key``, which the authenticator that proved it sets: the token's hash
for a JWT, the key id plus a digest of its entry for an API key, the
certificate's CN for mTLS. So steady traffic finds its decision without
re-deriving roles and facts, whichever way it authenticates, and whether or
not the authenticator hands back the same object each time. The key only finds
an entry: a hit also requires the stored identity to be the caller's (the same
object, or an equal one), so a key that two different identities share (a
changed mTLS role list, an authenticator's bug) is a miss, never the other
identity's decision. An identity without a key is never memoised. The memo
holds only cacheable decisions (none that read ``request.*``), is a
``ClearWhenFull`` (a miss costs one lookup in the cache behind it) and dies
with the compiled policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..cache import ClearWhenFull, Lru
from ..pipeline import Decision, Identity
from .compile import DEFAULT_DENY, ID_COLUMN, CompiledPolicy, CompiledRule
from .truth import UNKNOWN, Facts, Path, Truth, value_token

if TYPE_CHECKING:
    from ..metrics import Metrics

MAX_SHAPES = 16  # distinct read-sets remembered per (roles, model, action)
MAX_IDENTITY_MEMO = 4096  # (identity cache key, model, action) decisions remembered; cleared when full


class Evaluation:
    """One request's pass through the enforcers; Casbin calls ``cond`` on it."""

    __slots__ = ("facts", "rules", "outcomes", "allows", "collect", "shadow_hits")

    def __init__(self, facts: Facts, rules: Mapping[str, CompiledRule]) -> None:
        self.facts = facts
        self.rules = rules
        self.outcomes: dict[str, Truth] = {}
        self.allows: list[str] = []
        self.collect = False
        self.shadow_hits: list[str] = []

    def outcome(self, rule: CompiledRule) -> Truth:
        found = self.outcomes.get(rule.id)
        if found is None:
            found = True if rule.condition is None else rule.condition.evaluate(self.facts)
            self.outcomes[rule.id] = found
        return found

    def cond(self, rule_id: str) -> bool:
        rule = self.rules.get(rule_id)
        if rule is None:
            return False
        outcome = self.outcome(rule)
        applies = outcome is True if rule.allow else outcome is not False
        if self.collect:  # shadow pass: note it, never let it count
            if applies and rule_id not in self.shadow_hits:
                self.shadow_hits.append(rule_id)
            return False
        if applies and rule.allow and rule_id not in self.allows:
            self.allows.append(rule_id)
        return applies

    def __repr__(self) -> str:  # Casbin formats its arguments for its (disabled) log on every call
        return "<evaluation>"


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision with the reasoning a security team needs to trust it."""

    decision: Decision
    outcomes: Mapping[str, Truth]  # rule id -> condition outcome, for rules Casbin reached
    reads: Mapping[Path, Any]  # attribute path -> value token
    cacheable: bool


class DecisionCache:
    """Bounded LRU of decisions keyed by (roles, model, action) + what the decision read."""

    def __init__(self, size: int) -> None:
        self.size = max(0, size)
        self._entries: Lru[tuple[Any, ...], Decision] = Lru(self.size)
        # orphaned entries (their base's read-sets forgotten by a clear) age out of the LRU
        self._shapes: ClearWhenFull[tuple[Any, ...], list[tuple[Path, ...]]] = ClearWhenFull(self.size)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, base: tuple[Any, ...], facts: Facts) -> Decision | None:
        shapes = self._shapes.get(base)
        if not shapes:
            return None
        for paths in shapes:
            key = (base, paths, tuple([value_token(facts.lookup(p)) for p in paths]))
            found = self._entries.get(key)
            if found is not None:
                return found
        return None

    def put(self, base: tuple[Any, ...], reads: Mapping[Path, Any], decision: Decision) -> None:
        if self.size == 0:
            return
        paths = tuple(reads)
        shapes = self._shapes.get(base)
        if shapes is None:
            shapes = self._shapes.put(base, [])
        if paths not in shapes:
            if len(shapes) >= MAX_SHAPES:
                return
            shapes.append(paths)
        self._entries.put((base, paths, tuple(reads.values())), decision)


class PolicyEnforcer:
    """Decisions for one compiled policy. Build a new one per load: its cache dies with it."""

    def __init__(self, compiled: CompiledPolicy, cache_size: int = 10_000, metrics: Metrics | None = None) -> None:
        self.compiled = compiled
        self.cache = DecisionCache(cache_size)
        self._by_identity: ClearWhenFull[tuple[str, str, str], tuple[Identity, Decision]] = \
            ClearWhenFull(min(cache_size, MAX_IDENTITY_MEMO))
        self._hit = metrics.policy_cache.labels(result="hit") if metrics else None
        self._miss = metrics.policy_cache.labels(result="miss") if metrics else None

    @property
    def document(self) -> Any:
        return self.compiled.document

    def decide(self, *, subject: str, roles: Any, claims: Mapping[str, Any], model: str,
               labels: Mapping[str, Any] | None, action: str, request: Mapping[str, Any],
               monitor: Mapping[str, bool] | None = None) -> Decision:
        return self._decide(subject, roles, claims, model, labels, action, request, monitor)[0]

    def decide_for(self, identity: Identity, model: str, labels: Mapping[str, Any] | None, action: str,
                   request: Callable[[], Mapping[str, Any]], monitor: Mapping[str, bool] | None = None) -> Decision:
        """``decide`` for an authenticated caller; ``request`` builds the request attributes only when needed.

        ``monitor``: the monitors in alarm for this caller and model (``Alarms``).
        When the policy's rules read monitors the memo is keyed by the alarm state
        as well (the alarm changes, the identity does not).
        """
        cache_key = identity.cache_key
        # a policy that reads monitors memoises per alarm state too: the alarms are all a monitor read can see
        memo_action = action if not self.compiled.reads_monitors or not monitor else f"{action}|{'|'.join(monitor)}"
        if cache_key is not None:
            memo = self._by_identity.get((cache_key, model, memo_action))
            if memo is not None and (memo[0] is identity or memo[0] == identity):
                if self._hit is not None:
                    self._hit.inc()
                return memo[1]
        decision, cacheable = self._decide(identity.subject, identity.roles, identity.claims or {}, model, labels,
                                           action, request(), monitor)
        if cacheable and cache_key is not None:
            self._by_identity[(cache_key, model, memo_action)] = (identity, decision)
        return decision

    def _decide(self, subject: str, roles: Any, claims: Mapping[str, Any], model: str,
                labels: Mapping[str, Any] | None, action: str, request: Mapping[str, Any],
                monitor: Mapping[str, bool] | None = None) -> tuple[Decision, bool]:
        """The decision and whether it may be reused: it read no ``request.*`` attribute."""
        effective = self.compiled.effective_roles(subject, roles)
        facts = make_facts(subject, roles, claims, model, labels, request, monitor)
        base = (effective, model, action)
        found = self.cache.get(base, facts)
        if found is not None:
            if self._hit is not None:
                self._hit.inc()
            return found, True
        if self._miss is not None:
            self._miss.inc()
        decision, evaluation = self._evaluate(effective, model, action, facts)
        if not facts.read_request:
            self.cache.put(base, facts.reads, decision)
        return decision, not facts.read_request

    def explain(self, *, subject: str, roles: Any, claims: Mapping[str, Any], model: str,
                labels: Mapping[str, Any] | None, action: str, request: Mapping[str, Any],
                monitor: Mapping[str, bool] | None = None) -> Explanation:
        """The uncached decision plus each reached rule's condition outcome and what was read."""
        effective = self.compiled.effective_roles(subject, roles)
        facts = make_facts(subject, roles, claims, model, labels, request, monitor)
        decision, evaluation = self._evaluate(effective, model, action, facts)
        return Explanation(decision, dict(evaluation.outcomes), dict(facts.reads), not facts.read_request)

    def _evaluate(self, roles: tuple[str, ...], model: str, action: str, facts: Facts) -> tuple[Decision, Evaluation]:
        compiled = self.compiled
        evaluation = Evaluation(facts, compiled.rules)
        subject_roles = (*roles, "*")  # "*" in a rule's roles matches every subject, even one with no roles
        allowed, explain = compiled.enforcer.enforce_ex(subject_roles, model, action, evaluation)
        if allowed:  # the first allow whose condition held, in rule order (whichever row Casbin's explain names)
            rule = evaluation.allows[0] if evaluation.allows else "unnamed-allow"
        elif explain:  # the deny row Casbin stopped at
            rule = str(explain[ID_COLUMN])
        else:
            rule = DEFAULT_DENY
        shadow: tuple[tuple[str, bool], ...] = ()
        if compiled.shadow_enforcer is not None:
            evaluation.collect = True
            compiled.shadow_enforcer.enforce_ex(subject_roles, model, action, evaluation)
            denied_by_rule = not allowed and rule != DEFAULT_DENY
            shadow = tuple((rule_id, compiled.rules[rule_id].allow and not denied_by_rule)
                           for rule_id in evaluation.shadow_hits)
        return Decision(bool(allowed), rule, roles, shadow), evaluation


def make_facts(subject: str, roles: Any, claims: Mapping[str, Any], model: str,
               labels: Mapping[str, Any] | None, request: Mapping[str, Any],
               monitor: Mapping[str, bool] | None = None) -> Facts:
    """The ``subject``/``model``/``request``/``monitor`` views a condition reads; claims are not copied when complete."""
    if claims.get("sub") != subject or "roles" not in claims:
        token_roles = list(roles) if isinstance(roles, (list, tuple)) else roles
        claims = {**claims, "sub": subject, "roles": claims.get("roles", token_roles)}
    return Facts(claims, {"name": model, "labels": labels or {}}, request, monitor)


def truth_name(value: Truth) -> str:
    return "unknown" if value is UNKNOWN else ("true" if value else "false")
