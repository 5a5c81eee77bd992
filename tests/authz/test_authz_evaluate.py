"""L4 AuthorizationPolicy evaluation: every field, both signs, actions, L7 fail-closed."""

from __future__ import annotations

from typing import Any

import pytest
from authz_rules import op, pol, src, when

from nodeagent.authz import Connection, authorize
from nodeagent.authz.evaluate import policy_matches
from nodeagent.snapshot.model import AuthorizationPolicies

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/bar/sa/curl"
FOREIGN = "spiffe://other.td/ns/foo/sa/sleep"


def conn(identity: str | None = SLEEP, ip: str = "10.0.1.5", port: int = 8080) -> Connection:
    return Connection(ip, "10.0.2.7", port, identity)


def allows(rule: dict[str, Any], c: Connection) -> bool:
    return policy_matches(pol("ALLOW", rule), c)


# -- from.source -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "values", "c", "expected"),
    [
        ("principals", ["cluster.local/ns/foo/sa/sleep"], conn(), True),
        ("principals", ["cluster.local/ns/foo/sa/other"], conn(), False),
        ("principals", ["cluster.local/ns/foo/*"], conn(), True),
        ("principals", ["*/sa/sleep"], conn(), True),
        ("principals", ["*"], conn(), True),
        ("principals", ["*"], conn(None), False),  # plaintext has no principal
        ("principals", ["cluster.local/ns/foo/sa/sleep"], conn(None), False),
        ("namespaces", ["foo"], conn(), True),
        ("namespaces", ["bar"], conn(), False),
        ("namespaces", ["f*"], conn(), True),
        ("namespaces", ["foo"], conn(None), False),
        ("ipBlocks", ["10.0.1.0/24"], conn(), True),
        ("ipBlocks", ["10.0.1.5"], conn(), True),
        ("ipBlocks", ["10.9.0.0/16"], conn(), False),
        ("ipBlocks", ["10.0.1.0/24"], conn(None), True),  # ipBlocks work without identity
        ("remoteIpBlocks", ["10.0.1.0/24"], conn(), True),
        ("serviceAccounts", ["foo/sleep"], conn(), True),
        ("serviceAccounts", ["sleep"], conn(), True),  # namespace of the policy
        ("serviceAccounts", ["bar/sleep"], conn(), False),
        ("trustDomains", ["cluster.local"], conn(), True),
        ("trustDomains", ["cluster.local"], conn(FOREIGN), False),
    ],
)
def test_source_positive_fields(
    field: str, values: list[str], c: Connection, expected: bool
) -> None:
    assert allows(src(**{field: values}), c) is expected


@pytest.mark.parametrize(
    ("field", "values", "c", "expected"),
    [
        ("notPrincipals", ["cluster.local/ns/foo/sa/sleep"], conn(), False),
        ("notPrincipals", ["cluster.local/ns/foo/sa/sleep"], conn(OTHER), True),
        ("notPrincipals", ["*"], conn(None), True),  # nothing to exclude without an identity
        ("notNamespaces", ["foo"], conn(), False),
        ("notNamespaces", ["foo"], conn(OTHER), True),
        ("notIpBlocks", ["10.0.1.0/24"], conn(), False),
        ("notIpBlocks", ["10.0.9.0/24"], conn(), True),
        ("notServiceAccounts", ["foo/sleep"], conn(), False),
        ("notServiceAccounts", ["foo/sleep"], conn(OTHER), True),
        ("notTrustDomains", ["other.td"], conn(FOREIGN), False),
    ],
)
def test_source_negative_fields(
    field: str, values: list[str], c: Connection, expected: bool
) -> None:
    assert allows(src(**{field: values}), c) is expected


def test_fields_inside_one_source_are_anded_and_from_entries_ored() -> None:
    both = src(namespaces=["foo"], ipBlocks=["10.9.0.0/16"])
    assert not allows(both, conn())
    either = {
        "from": [{"source": {"namespaces": ["bar"]}}, {"source": {"ipBlocks": ["10.0.1.0/24"]}}]
    }
    assert allows(either, conn())


# -- to.operation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "port", "expected"),
    [
        ({"ports": ["8080"]}, 8080, True),
        ({"ports": ["8080", "9090"]}, 9090, True),
        ({"ports": ["8080"]}, 80, False),
        ({"notPorts": ["8080"]}, 8080, False),
        ({"notPorts": ["8080"]}, 80, True),
        ({"ports": ["80", "8080"], "notPorts": ["8080"]}, 8080, False),
    ],
)
def test_operation_ports(fields: dict[str, Any], port: int, expected: bool) -> None:
    assert allows(op(**fields), conn(port=port)) is expected


def test_from_to_and_when_are_all_required() -> None:
    rule = {**src(namespaces=["foo"]), **op(ports=["8080"]), **when("source.ip", ["10.0.1.0/24"])}
    assert allows(rule, conn())
    assert not allows(rule, conn(port=80))
    assert not allows(rule, conn(OTHER))
    assert not allows(rule, conn(ip="10.7.0.1"))


# -- when -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "c", "expected"),
    [
        (when("source.ip", ["10.0.1.0/24"]), conn(), True),
        (when("source.ip", not_values=["10.0.1.0/24"]), conn(), False),
        (when("remote.ip", ["10.0.1.5"]), conn(), True),
        (when("source.namespace", ["foo"]), conn(), True),
        (when("source.namespace", ["foo"]), conn(None), False),
        (when("source.namespace", not_values=["foo"]), conn(OTHER), True),
        (when("source.principal", ["cluster.local/ns/foo/sa/sleep"]), conn(), True),
        (when("source.principal", ["cluster.local/ns/foo/sa/x"]), conn(), False),
        (when("source.serviceAccount", ["foo/sleep"]), conn(), True),
        (when("destination.port", ["8080"]), conn(), True),
        (when("destination.port", ["8080"]), conn(port=81), False),
        (when("destination.port", not_values=["8080"]), conn(port=81), True),
        (when("destination.ip", ["10.0.2.0/24"]), conn(), True),
        (when("destination.ip", ["10.0.3.0/24"]), conn(), False),
    ],
)
def test_when_conditions(rule: dict[str, Any], c: Connection, expected: bool) -> None:
    assert allows(rule, c) is expected


# -- L7 attributes at L4 ----------------------------------------------------------------------

L7_RULES = [
    op(methods=["GET"]),
    op(paths=["/admin"]),
    op(hosts=["example.com"]),
    op(notMethods=["POST"]),
    src(requestPrincipals=["*"]),
    src(notRequestPrincipals=["*"]),
    when("request.headers[x-user]", ["alice"]),
    when("request.auth.claims[iss]", ["me"]),
    when("connection.sni", ["a.example.com"]),
]


@pytest.mark.parametrize("rule", L7_RULES)
def test_l7_only_allow_rule_never_matches(rule: dict[str, Any]) -> None:
    decision = authorize(AuthorizationPolicies(allow=(pol("ALLOW", rule),)), conn())
    assert not decision.allowed


@pytest.mark.parametrize("rule", L7_RULES)
def test_l7_only_deny_rule_matches_fail_closed(rule: dict[str, Any]) -> None:
    decision = authorize(AuthorizationPolicies(deny=(pol("DENY", rule, name="no-get"),)), conn())
    assert not decision.allowed
    assert decision.policy == "foo/no-get"


def test_deny_with_l7_and_l4_parts_still_needs_the_l4_parts() -> None:
    rule = {**src(namespaces=["bar"]), **op(methods=["GET"])}
    policies = AuthorizationPolicies(deny=(pol("DENY", rule),))
    assert authorize(policies, conn()).allowed  # namespace foo: L4 part does not match
    assert not authorize(policies, conn(OTHER)).allowed


# -- actions and defaults ---------------------------------------------------------------------


def test_no_policy_allows() -> None:
    d = authorize(AuthorizationPolicies(), conn())
    assert d.allowed
    assert d.policy is None


def test_allow_policy_selecting_the_workload_denies_by_default() -> None:
    policies = AuthorizationPolicies(
        allow=(pol("ALLOW", src(namespaces=["bar"]), name="only-bar"),)
    )
    assert authorize(policies, conn(OTHER)).allowed
    d = authorize(policies, conn())
    assert not d.allowed
    assert d.policy == "foo/only-bar"
    assert "no ALLOW policy matched" in d.reason


def test_allow_without_rules_denies_all_and_empty_rule_allows_all() -> None:
    assert not authorize(AuthorizationPolicies(allow=(pol("ALLOW"),)), conn()).allowed
    assert authorize(AuthorizationPolicies(allow=(pol("ALLOW", {}),)), conn(None)).allowed


def test_deny_without_rules_denies_nothing() -> None:
    assert authorize(AuthorizationPolicies(deny=(pol("DENY"),)), conn()).allowed


def test_deny_wins_over_allow() -> None:
    policies = AuthorizationPolicies(
        allow=(pol("ALLOW", {}, name="all"),),
        deny=(pol("DENY", src(principals=["cluster.local/ns/foo/sa/sleep"]), name="no-sleep"),),
    )
    d = authorize(policies, conn())
    assert not d.allowed
    assert d.policy == "foo/no-sleep"
    assert authorize(policies, conn(OTHER)).allowed


def test_any_matching_allow_policy_allows() -> None:
    policies = AuthorizationPolicies(
        allow=(
            pol("ALLOW", src(namespaces=["x"]), name="a"),
            pol("ALLOW", op(ports=["8080"]), name="b"),
        )
    )
    d = authorize(policies, conn())
    assert d.allowed
    assert d.policy == "foo/b"


def test_audit_is_reported_and_never_decides() -> None:
    policies = AuthorizationPolicies(audit=(pol("AUDIT", {}, name="watch"),))
    d = authorize(policies, conn())
    assert d.allowed
    assert d.audited == ("foo/watch",)
    denied = AuthorizationPolicies(allow=(pol("ALLOW"),), audit=(pol("AUDIT", {}, name="watch"),))
    d = authorize(denied, conn())
    assert not d.allowed
    assert d.audited == ("foo/watch",)


def test_plaintext_client_is_only_matched_by_identity_free_rules() -> None:
    policies = AuthorizationPolicies(allow=(pol("ALLOW", src(principals=["*"])),))
    assert not authorize(policies, conn(None)).allowed
    assert authorize(policies, conn()).allowed


def test_malformed_principal_has_no_namespace() -> None:
    c = conn("spiffe://cluster.local/weird")
    assert c.namespace is None
    assert not allows(src(namespaces=["*"]), c)
    assert allows(src(principals=["cluster.local/weird"]), c)
