"""The bench's ``redis`` workload wiring for issue 25 (one Redis against a 3-master
cluster): which configurations run where, what a node's ``INFO commandstats`` says it
published, and the targets drawn from that. The numbers themselves are the bench's
(``python -m bench --workloads redis``), never asserted here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import brokers, run

from redis_server import RedisServer

#: ``INFO commandstats`` as Debian's redis-server 7.0 writes it (abridged)
COMMANDSTATS = """# Commandstats\r
cmdstat_spublish:calls=1200,usec=2400,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r
cmdstat_evalsha:calls=310,usec=99000,usec_per_call=319.35,rejected_calls=0,failed_calls=2\r
cmdstat_eval:calls=4,usec=800,usec_per_call=200.00,rejected_calls=0,failed_calls=0\r
cmdstat_ping:calls=7,usec=3,usec_per_call=0.43,rejected_calls=0,failed_calls=0\r
"""
CPU = """# CPU\r
used_cpu_sys:1.250000\r
used_cpu_user:2.500000\r
used_cpu_sys_children:0.000000\r
"""


def test_a_nodes_commandstats_give_its_publishes_script_runs_and_cpu() -> None:
    assert brokers.node_counters(COMMANDSTATS, CPU) == {
        "spublish": 1200,
        "publish": 0,
        "scripts": 314,
        "cpu_s": 3.75,
    }


def counters(spublish: int, publish: int = 0) -> dict[str, float]:
    return {"spublish": spublish, "publish": publish, "scripts": 10, "cpu_s": 0.5}


def test_sharded_means_about_a_third_each_and_no_classic_publish() -> None:
    spread = brokers.node_shares({"a": counters(340), "b": counters(310), "c": counters(350)})
    assert [n["share"] for n in spread.values()] == [0.34, 0.31, 0.35]
    assert brokers.sharded(spread)
    lopsided = brokers.node_shares({"a": counters(600), "b": counters(200), "c": counters(200)})
    assert not brokers.sharded(lopsided)
    classic = brokers.node_shares(
        {"a": counters(0, 340), "b": counters(0, 310), "c": counters(0, 350)}
    )
    assert not brokers.sharded(classic)  # PUBLISH reaches every node of a cluster
    assert not brokers.sharded(brokers.node_shares({"one": counters(0, 1000)}))
    assert not brokers.sharded(brokers.node_shares({"a": counters(0), "b": counters(0)}))


def test_the_cluster_configurations_run_only_where_rooms_spread() -> None:
    servers = brokers.broker_servers("redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:2")
    at = {
        scenario: [s.name for s in brokers.servers_for(scenario, servers)]
        for scenario in brokers.SCENARIOS
    }
    assert at["rooms"] == [
        "memory-batch",
        "memory",
        "redis-1w-batch",
        "redis-1w",
        "redis-2w-batch",
        "redis-2w",
        "cluster-1w-batch",
        "cluster-2w-batch",
    ]
    assert at["fanout100"] == at["rooms"][:6]
    cluster = {s.name: s for s in servers}["cluster-2w-batch"]
    assert cluster.env == {"ROOMCAST_REDIS_URL": "redis+cluster://127.0.0.1:2"}
    assert cluster.command(1)[-2:] == ["-w", "2"]
    assert set(brokers.SINGLE_OF) == {s.name for s in servers if brokers.is_cluster(s.name)}


def row(deliveries: int, nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "deliveries_per_s": deliveries,
        "sent": 6000,
        "server_cpu_us_per_delivery": 25.0,
        "redis_nodes": nodes,
        "order": {},
    }


def test_the_issues_cluster_targets_and_their_table() -> None:
    spread = brokers.node_shares({"a": counters(340), "b": counters(310), "c": counters(350)})
    one = brokers.node_shares({"127.0.0.1:1": counters(0, 1000)})
    servers = {
        "redis-1w-batch@rooms": row(30_000, one),
        "cluster-1w-batch@rooms": row(24_000, spread),
        "redis-2w-batch@rooms": row(36_000, one),
        "cluster-2w-batch@rooms": row(27_000, {}),
    }
    found = {t["target"]: t for t in run.cluster_targets(servers)}
    shares = found[
        "redis/rooms: cluster-1w-batch: each master carries between 20% and 50% of the "
        "publishes (about a third), and no classic PUBLISH"
    ]
    assert shares["met"] is True
    assert shares["detail"] == (
        "SPUBLISH per master: 34.0% (340), 31.0% (310), 35.0% (350); PUBLISH 0"
    )
    ratio = next(t for name, t in found.items() if "cluster-1w-batch deliveries/s" in name)
    assert ratio["met"] is None  # reported: one machine cannot show a cluster's gain
    assert ratio["detail"] == (
        "24,000/s vs 30,000/s (0.80x); 200.0 messages per script run, 25.0 µs CPU/delivery "
        "vs 600.0 messages per script run, 25.0 µs CPU/delivery"
    )
    assert not next(t for n, t in found.items() if "cluster-2w-batch: each" in n)["met"]
    assert run.verdict(None) == "reported"
    table = "\n".join(run.node_table(servers))
    assert "| rooms | cluster-1w-batch | b | 310 | 0 | 31.0% | 10 | 0.50 |" in table
    assert "| rooms | redis-1w-batch | 127.0.0.1:1 | 0 | 1,000 | 100.0% | 10 | 0.50 |" in table


def test_a_real_redis_counts_the_publishes_its_scripts_make(tmp_path: Path) -> None:
    """What the bench reads from a live redis-server 7.0: (S)PUBLISH called from a script
    counts as a publish of that node, the script as a script run."""
    redis = RedisServer(tmp_path, persistent=False)
    redis.start()
    try:
        sampler = brokers.NodeSampler(lambda: brokers.read_nodes({"node": redis.port}))
        sampler.sample()
        script = "redis.call('SPUBLISH', KEYS[1], 'x'); redis.call('PUBLISH', KEYS[1], 'y')"
        for _ in range(3):
            redis.command("EVAL", script, "1", "roomcast:{room}:events")
        redis.command("SPUBLISH", "roomcast:{room}:events", "z")
        sampler.sample()
    finally:
        redis.kill()
    (t0, _), (t1, _) = sampler.series
    node = sampler.window(t0, t1)["node"]
    assert (node["spublish"], node["publish"], node["scripts"]) == (4, 3, 3)
    assert node["pubsub"] == 7
    assert node["share"] == 1.0
