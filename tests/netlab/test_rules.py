"""The lab's pure parts, without root: router rules per kind, link-condition rules and marks, the
address plan and topology checks, lab records. The real behaviour is checked in test_lab.py."""

from __future__ import annotations

import random
import re

import pytest

from tests.netlab import BEHAVIOUR, Lab, LabError, LinkCondition, NatKind
from tests.netlab.linkemu import delay_of_mark
from tests.netlab.netem import DELAY_FLAG, delay_mark, links_ruleset
from tests.netlab.routers import flush_mappings_script, router_ruleset
from tests.netlab.state import LabRecord, lab_id_of_namespace


def chain(ruleset: str, name: str) -> str:
    match = re.search(rf"chain {name} {{\n(.*?)\n  }}", ruleset, re.S)
    assert match, f"no chain {name} in:\n{ruleset}"
    return match.group(1)


@pytest.mark.parametrize("kind", list(NatKind), ids=str)
def test_every_router_drops_unsolicited_inbound_by_default(kind: NatKind) -> None:
    ruleset = router_ruleset(kind)
    for name in ("input", "forward"):
        body = chain(ruleset, name)
        assert "policy drop;" in body
        assert body.strip().splitlines()[-1].strip().endswith("drop")
    assert 'iifname != "wan" accept' in chain(ruleset, "forward")


@pytest.mark.parametrize("kind", list(NatKind), ids=str)
def test_translation_matches_the_kind(kind: NatKind) -> None:
    ruleset = router_ruleset(kind)
    behaviour = BEHAVIOUR[kind]
    assert ("masquerade" in ruleset) == behaviour.nat
    assert ("fully-random" in ruleset) == (kind == NatKind.SYMMETRIC)
    cone = kind in (NatKind.FULL_CONE, NatKind.RESTRICTED_CONE)
    assert ("dnat to" in ruleset) == cone
    assert ("@contacted dnat" in ruleset) == (kind == NatKind.RESTRICTED_CONE)
    assert ("meta l4proto udp counter" in ruleset) == (not behaviour.udp)
    assert (flush_mappings_script(kind) is not None) == cone


def test_cone_mappings_expire_after_the_configured_time() -> None:
    ruleset = router_ruleset(NatKind.FULL_CONE, mapping_timeout_s=7)
    assert ruleset.count("timeout 7s;") == 2


def test_only_symmetric_is_not_hole_punchable() -> None:
    punchable = {kind for kind in NatKind if BEHAVIOUR[kind].hole_punchable}
    assert punchable == set(NatKind) - {NatKind.SYMMETRIC, NatKind.UDP_BLOCKED}


def test_link_rules_drop_cut_lose_and_mark() -> None:
    ruleset = links_ruleset(
        {
            "eth0": LinkCondition(delay_ms=40, jitter_ms=5, loss=0.25),
            "l-a1": LinkCondition(delay_ms=40, loss=0.5, cut=True),
        }
    )
    ingress = chain(ruleset, "ingress")
    assert "priority -310;" in ingress  # before conntrack and the NFQUEUE rule
    assert 'iifname "eth0" numgen random mod 1000000 < 250000' in ingress
    assert f'iifname "eth0" meta mark set {delay_mark(40, 5):#x}' in ingress
    cut = [line for line in ingress.splitlines() if '"l-a1"' in line]
    assert len(cut) == 1 and cut[0].strip().endswith("drop") and "numgen" not in cut[0]


def test_clean_links_have_no_rules() -> None:
    assert "iifname" not in links_ruleset({})


@pytest.mark.parametrize(
    "fields",
    [
        {"delay_ms": -1},
        {"delay_ms": 40_000},
        {"delay_ms": 10, "jitter_ms": 11},
        {"loss": 1.5},
        {"loss": float("nan")},
    ],
)
def test_bad_link_conditions_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LinkCondition(**fields)  # type: ignore[arg-type]


def test_delay_mark_round_trips_with_jitter_bounds() -> None:
    rng = random.Random(1)
    mark = delay_mark(30, 10)
    assert mark & DELAY_FLAG
    delays = [delay_of_mark(mark, rng) for _ in range(1000)]
    assert 0.020 <= min(delays) < 0.022 and 0.038 < max(delays) <= 0.040
    assert delay_of_mark(delay_mark(25, 0), rng) == 0.025
    assert delay_of_mark(delay_mark(2, 2), rng) >= 0


def test_address_plan_uses_documentation_ranges_only() -> None:
    lab = Lab(lab_id="t1")
    lab.add_public_host("relay1")
    lab.add_nat("nat_a", "symmetric")
    lab.add_host("a1", behind="nat_a")
    lab.add_host("a2", behind="nat_a")
    lab.add_nat("fw", "firewall")
    lab.add_host("f1", behind="fw")
    assert lab.address("relay1") == "198.51.100.10"
    assert lab.address("nat_a") == "203.0.113.10"
    assert (lab.address("a1"), lab.address("a2")) == ("10.1.0.10", "10.1.0.11")
    assert lab.external_address("a1") == "203.0.113.10"
    assert lab.address("f1") == lab.external_address("f1") == "192.0.2.2"
    assert lab.netns("a1") == "netlab-t1-a1"
    assert lab.kind("a1") == NatKind.SYMMETRIC
    assert "netlab-t1-a1" in lab.describe()


def test_topology_mistakes_are_refused_with_a_reason() -> None:
    lab = Lab(lab_id="t2")
    lab.add_nat("nat_a")
    with pytest.raises(ValueError, match="already exists"):
        lab.add_nat("nat_a")
    with pytest.raises(ValueError, match="not a router"):
        lab.add_host("a1", behind="nowhere")
    with pytest.raises(ValueError, match="must match"):
        lab.add_public_host("Relay-1")
    with pytest.raises(ValueError, match="must match"):
        lab.add_public_host("a_name_too_long_for_ifnames")
    with pytest.raises(ValueError, match="private"):
        lab.add_nat("nat_b", lan="8.8.8.0/24")
    with pytest.raises(ValueError, match="public LAN"):
        lab.add_nat("fw", "firewall", lan="10.9.0.0/24")
    with pytest.raises(ValueError):
        lab.add_nat("nat_c", "carrier_grade")
    with pytest.raises(LabError, match="not running"):
        lab.set_link("nat_a", delay_ms=5)
    with pytest.raises(ValueError, match="lab id"):
        Lab(lab_id="Bad-Id")


def test_lab_records_name_their_namespaces() -> None:
    record = LabRecord("abc123", None, None)
    assert record.netns_prefix == "netlab-abc123-"
    assert lab_id_of_namespace("netlab-abc123-relay1") == "abc123"
    assert lab_id_of_namespace("netlab-abc123") is None
    assert lab_id_of_namespace("other-abc123-x") is None
    assert record.owner_alive()  # detached labs live until `down`
