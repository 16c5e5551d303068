"""The module-affinity policy of `tunehub serve --ray` as pure functions (server/routing.py):
replicas' reports in, a ranking of replicas out. No Ray here."""

from __future__ import annotations

import collections
from dataclasses import asdict

import pytest

from tunehub.server.routing import OwnRequests, ReplicaLoad, merge_statuses, rank_replicas, rendezvous, request_refs

MB = 1 << 20


def load(replica: str, modules: tuple[str, ...] = (), *, requests: int = 0, loading: int = 0, used: int = 0, **kw) -> ReplicaLoad:
    return ReplicaLoad(
        replica,
        modules=frozenset(modules),
        requests=requests,
        loading=loading,
        used_bytes=used,
        budget_bytes=100 * MB,
        capacity=8,
        **kw,
    )


def test_the_replica_that_holds_the_module_comes_first():
    a, b = load("a"), load("b", ("acme/sum@3",))
    assert rank_replicas(["acme/sum@3"], [a, b]) == ["b", "a"]
    assert rank_replicas(["acme/sum@3"], [b, a]) == ["b", "a"]


def test_a_busier_holder_still_wins_until_it_is_overloaded():
    holder = load("a", ("acme/sum@3",), requests=6)  # 6 of its 8 slots busy: warm beats idle
    idle = load("b")
    assert rank_replicas(["acme/sum@3"], [holder, idle])[0] == "a"
    full = load("a", ("acme/sum@3",), requests=8)  # every slot busy: a row would wait
    assert rank_replicas(["acme/sum@3"], [full, idle]) == ["b", "a"]


def test_among_holders_the_least_pressured_wins():
    one = load("a", ("acme/sum@3",), requests=3)
    two = load("b", ("acme/sum@3",), requests=1)
    assert rank_replicas(["acme/sum@3"], [one, two]) == ["b", "a"]
    # pressure counts queued loads and pool fullness too
    loading = load("a", ("acme/sum@3",), requests=1, loading=4)
    calm = load("b", ("acme/sum@3",), requests=1)
    assert rank_replicas(["acme/sum@3"], [loading, calm])[0] == "b"
    assert load("a", used=100 * MB).pressure > load("b", used=0).pressure


def test_a_module_nobody_holds_goes_to_the_least_pressured_replica():
    busy, calm = load("a", requests=6), load("b", requests=0)
    assert rank_replicas(["acme/new@1"], [busy, calm]) == ["b", "a"]
    assert rank_replicas([], [busy, calm]) == ["b", "a"]


def test_a_module_keeps_its_hashed_home_under_a_small_imbalance():
    refs = [f"m/{i}@1" for i in range(40)]
    even = [load("a"), load("b")]
    homes = {ref: rank_replicas([ref], even)[0] for ref in refs}
    skewed = [load("a", requests=2), load("b")]  # a quarter of a batch apart: still "equal"
    assert {ref: rank_replicas([ref], skewed)[0] for ref in refs} == homes
    far = [load("a", requests=5), load("b")]  # more than half a batch apart: the calmer one
    assert {rank_replicas([ref], far)[0] for ref in refs} == {"b"}


def test_equally_loaded_replicas_split_new_modules_by_hash_and_stick_to_it():
    replicas = [load("a"), load("b"), load("c")]
    firsts = {f"m/{i}@1": rank_replicas([f"m/{i}@1"], replicas)[0] for i in range(300)}
    counts = collections.Counter(firsts.values())
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 60  # spread, not all on one pool
    again = {ref: rank_replicas([ref], list(reversed(replicas)))[0] for ref in firsts}
    assert again == firsts  # the same replica each time the module comes back (order-independent)
    assert rendezvous(["x"], "a") == rendezvous(["x"], "a") != rendezvous(["x"], "b")


def test_references_match_what_the_replica_served_and_aliases_fall_back_to_the_repo():
    served = load("a", ("acme/sum@3",), refs={"acme/sum@prod": "acme/sum@3"})
    assert served.holds("acme/sum@prod") and served.holds("acme/sum@3")
    assert not served.holds("acme/sum@2")  # another exact version is not resident
    assert served.holds("acme/sum@staging") and served.holds("acme/sum")  # an alias: any version of the repo
    assert not served.holds("acme/other") and not served.holds("not a ref!")


def test_compositions_prefer_the_replica_holding_most_parts():
    one = load("a", ("acme/x@1",))
    both = load("b", ("acme/x@1", "acme/y@1"), requests=2)
    assert rank_replicas(["acme/x@1", "acme/y@1"], [one, both])[0] == "b"


def test_from_stats_corrects_the_report_with_the_routers_own_requests():
    stats = {"modules": ["acme/a@1"], "refs": {"acme/a": "acme/a@1"}, "requests": 3, "capacity": 4, "loading": 1}
    # 1 of the 3 reported was this router's (since ended); it has 2 there now; 2 came from others
    seen = ReplicaLoad.from_stats("r1", stats, own_now=2, own_at_report=1, placed=["acme/b@prod"])
    assert seen.requests == 4 and seen.overloaded and seen.loading == 1 and seen.capacity == 4
    assert ReplicaLoad.from_stats("r1", stats, own_now=0, own_at_report=3).requests == 0  # all ended since
    assert seen.holds("acme/a") and seen.holds("acme/b@prod")
    fresh = ReplicaLoad.from_stats("r2", None)  # no report yet
    assert fresh.requests == 0 and not fresh.modules and fresh.capacity == 16
    assert rank_replicas(["acme/b@prod"], [fresh, seen])[0] == "r2"  # the holder is overloaded


def test_request_refs_reads_generate_payloads_only():
    assert request_refs({"op": "generate", "parts": [{"model": "a/b@1", "weight": 1.0}, {"model": "c/d"}]}) == ["a/b@1", "c/d"]
    assert request_refs({"op": "generate", "parts": []}) == []
    assert request_refs({"op": "admin", "action": "status"}) == []
    assert request_refs(None) == [] and request_refs("text") == []
    assert rank_replicas(["a/b@1"], []) == []


def test_merge_statuses_sums_counts_and_merges_modules():
    merged = merge_statuses(
        {
            "r1": {
                "budget_bytes": 10,
                "resident_bytes": 4,
                "hits": 3,
                "misses": 1,
                "modules": [{"module": "a/b@1", "bytes": 4, "pinned": False, "in_use": 1, "hits": 3}],
                "loads_by_module": {"a/b@1": 1},
            },
            "r2": {
                "budget_bytes": 10,
                "resident_bytes": 4,
                "hits": 1,
                "misses": 3,
                "modules": [{"module": "a/b@1", "bytes": 4, "pinned": True, "in_use": 0, "hits": 1}],
                "loads_by_module": {"a/b@1": 2},
            },
        }
    )
    assert merged["budget_bytes"] == 20 and merged["resident_bytes"] == 8 and merged["hit_rate"] == 0.5
    (entry,) = merged["modules"]
    assert entry["bytes"] == 8 and entry["pinned"] and entry["replicas"] == ["r1", "r2"] and entry["in_use"] == 1
    assert merged["loads_by_module"] == {"a/b@1": 3} and set(merged["replicas"]) == {"r1", "r2"}


def test_ray_options_are_checked_with_the_rest_of_the_config(tmp_path, capsys):
    from tunehub.errors import ConfigError
    from tunehub.sdk.cli import main
    from tunehub.server.serve import RayOptions, ServeConfig, check_config

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as refused:
        check_config(ServeConfig(base=str(tmp_path), ray={"replicas": 0, "router": "closest", "retries": -1}))
    problems = "\n".join(refused.value.problems)
    for needle in ("replicas must be at least 1", "router must be one of affinity, random", "retries must be >= 0"):
        assert needle in problems, problems
    with pytest.raises(ConfigError, match="Ray options"):
        check_config(ServeConfig(base=str(tmp_path), ray={"replica": 2}))
    # with --ray the replicas resolve the base themselves: a folder is made absolute, no more
    resolved = check_config(ServeConfig(base=str(tmp_path), ray=asdict(RayOptions(replicas=3)))).config
    assert resolved.base == str(tmp_path.resolve()) and resolved.ray["replicas"] == 3
    assert main(["serve", "--base", str(tmp_path), "--replicas", "3"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err


def test_own_requests_count_what_runs_now_and_what_ran_at_a_report():
    own = OwnRequests(keep_s=10.0)
    own.sent("a", "r1", at=1.0)
    own.sent("b", "r1", at=2.0)
    own.sent("c", "r2", at=2.0)
    own.ended("a", at=3.0)
    own.ended("unknown", at=3.0)  # never sent by this router: ignored
    assert own.running("r1") == 1 and own.running("r2") == 1
    assert own.running("r1", at=2.5) == 2 and own.running("r1", at=3.5) == 1 and own.running("r1", at=0.5) == 0
    own.sent("d", "r2", at=20.0)  # a ended long ago: forgotten; b still runs
    assert own.running("r1", at=2.5) == 1 and own.running("r1") == 1 and own.running("r2") == 2
    own = OwnRequests(keep_s=10.0, lost_s=100.0)
    own.sent("x", "r1", at=0.0)
    own.sent("y", "r1", at=200.0)  # x never ended: lost, no longer counted
    assert own.running("r1") == 1
