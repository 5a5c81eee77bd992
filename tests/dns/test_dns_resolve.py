"""Which names the mesh answers, with what, for which client namespace (pure, no sockets)."""

from __future__ import annotations

import pytest
from dns_mesh import (
    API_VIP,
    DB_PODS,
    OTHER_REVIEWS_VIP,
    PENDING_POD,
    REVIEWS_VIP,
    WILD_VIP,
    mesh_documents,
    mesh_snapshot,
    snapshot_of,
)

from nodeagent.dns.message import (
    CLASS_IN,
    RCODE_NOERROR,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_MX,
    TYPE_SRV,
    Question,
    name_from_text,
    name_text,
)
from nodeagent.dns.resolve import TTL, Answer, Forward, answer
from nodeagent.snapshot import Snapshot


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return mesh_snapshot()


def ask(snap: Snapshot, name: str, qtype: int = TYPE_A, ns: str = "default") -> Answer | Forward:
    return answer(snap, ns, Question(name_from_text(name), qtype, CLASS_IN))


def addresses(result: Answer | Forward) -> list[str]:
    assert isinstance(result, Answer), result
    assert result.rcode == RCODE_NOERROR
    return sorted(r.address for r in result.records if r.address)


@pytest.mark.parametrize(
    "name",
    [
        "reviews",
        "reviews.default",
        "reviews.default.svc",
        "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local.",
        "REVIEWS.Default.svc.cluster.local",
    ],
)
def test_service_forms_from_its_namespace(snap: Snapshot, name: str) -> None:
    result = ask(snap, name)
    assert addresses(result) == [REVIEWS_VIP]
    assert isinstance(result, Answer)
    assert result.service == "Service/default/reviews"
    assert result.reason == "vip"
    (record,) = result.records
    assert record.ttl == TTL
    assert record.name == name_from_text(name)  # owner = the name as asked, case kept


def test_short_name_depends_on_the_client_namespace(snap: Snapshot) -> None:
    assert addresses(ask(snap, "reviews", ns="other")) == [OTHER_REVIEWS_VIP]
    assert addresses(ask(snap, "reviews.default", ns="other")) == [REVIEWS_VIP]
    # No `reviews` in namespace `data`: the short name is not ours there.
    assert ask(snap, "reviews", ns="data") == Forward("not-mesh")


def test_search_domain_appended_by_the_client_is_stripped_with_a_cname(snap: Snapshot) -> None:
    # ndots:5 makes a resolver try "reviews.other" + the first search domain first.
    asked = "reviews.other.default.svc.cluster.local"
    result = ask(snap, asked)
    assert addresses(result) == [OTHER_REVIEWS_VIP]
    assert isinstance(result, Answer)
    cname, a = result.records
    assert cname.rtype == TYPE_CNAME
    assert cname.name == name_from_text(asked)
    assert cname.target == name_from_text("reviews.other")
    assert a.name == name_from_text("reviews.other")
    # ServiceEntry host behind a search domain, too.
    assert addresses(ask(snap, "api.example.com.svc.cluster.local")) == [API_VIP]


def test_headless_service_answers_its_pods(snap: Snapshot) -> None:
    result = ask(snap, "db.data", ns="default")
    assert addresses(result) == sorted(DB_PODS)
    assert isinstance(result, Answer)
    assert result.reason == "headless"
    assert addresses(ask(snap, "db", ns="data")) == sorted(DB_PODS)


def test_service_without_cluster_ip_answers_its_pods(snap: Snapshot) -> None:
    assert addresses(ask(snap, "pending")) == [PENDING_POD]


def test_headless_without_pods_is_noerror_empty(snap: Snapshot) -> None:
    result = ask(snap, "empty")
    assert result == Answer(RCODE_NOERROR, (), "Service/default/empty", "no-endpoints")


def test_aaaa_for_a_mesh_name_is_noerror_empty(snap: Snapshot) -> None:
    for name in ("reviews", "db.data", "api.example.com"):
        result = ask(snap, name, TYPE_AAAA)
        assert isinstance(result, Answer), name
        assert result.rcode == RCODE_NOERROR
        assert result.records == ()
        assert result.reason == "ipv4-only"


def test_service_entry_hosts(snap: Snapshot) -> None:
    assert addresses(ask(snap, "api.example.com")) == [API_VIP]
    # From any namespace: a ServiceEntry host is a full name.
    assert addresses(ask(snap, "api.example.com", ns="data")) == [API_VIP]


@pytest.mark.parametrize("name", ["a.wild.example.org", "x.y.wild.example.org"])
def test_wildcard_service_entry_matches_any_depth(snap: Snapshot, name: str) -> None:
    result = ask(snap, name)
    assert addresses(result) == [WILD_VIP]
    assert isinstance(result, Answer)
    assert [name_text(r.name) for r in result.records] == [name]


@pytest.mark.parametrize(
    ("name", "qtype", "reason"),
    [
        ("wild.example.org", TYPE_A, "not-mesh"),  # `*.x` does not match `x` itself
        ("example.com", TYPE_A, "not-mesh"),
        ("google.com.default.svc.cluster.local", TYPE_A, "not-mesh"),
        ("nosuch.default.svc.cluster.local", TYPE_A, "not-mesh"),
        ("noaddr.example.net", TYPE_A, "not-mesh"),  # ServiceEntry without VIP
        ("reviews", TYPE_MX, "type"),
        ("_http._tcp.reviews.default.svc.cluster.local", TYPE_SRV, "type"),
    ],
)
def test_forwarded(snap: Snapshot, name: str, qtype: int, reason: str) -> None:
    assert ask(snap, name, qtype) == Forward(reason)


def test_other_classes_and_the_root_are_forwarded(snap: Snapshot) -> None:
    assert answer(snap, "default", Question(name_from_text("reviews"), TYPE_A, 3)) == Forward(
        "class"
    )
    assert answer(snap, "default", Question((), TYPE_A, CLASS_IN)) == Forward("root")


def test_cluster_domain_comes_from_the_snapshot() -> None:
    snap = snapshot_of(mesh_documents(), cluster_domain="corp.example")
    assert addresses(ask(snap, "reviews.default.svc.corp.example")) == [REVIEWS_VIP]
    assert addresses(ask(snap, "reviews")) == [REVIEWS_VIP]
    assert ask(snap, "reviews.default.svc.cluster.local") == Forward("not-mesh")


def test_empty_mesh_forwards_everything() -> None:
    snap = snapshot_of([])
    assert ask(snap, "reviews") == Forward("not-mesh")
