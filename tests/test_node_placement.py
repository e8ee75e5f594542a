"""Placement per node: pools sized from each alive node's CPUs and GPUs, checked node by node (an actor
never spans nodes), the plan as logged; a node lost mid-job noticed while Ray Data waits."""

import logging
import threading

import pytest

from pipelines.config import ConfigError, compose_job
from pipelines.manifest import Question
from pipelines.runner import (
    RAY_UNITS,
    Node,
    NodeLostError,
    NodesLost,
    NodeWatch,
    placement,
    question_rows,
    rows_watched,
    unplaced_gpu_actor,
)


def job_for(tiny_dir, *overrides: str):
    return compose_job(f"model.path={tiny_dir}", "data.manifest=m.jsonl", "output.path=o.jsonl", *overrides)


def counts(placed, stage: str) -> list[int]:
    return [per_node[stage] for per_node in placed.nodes.values()]


def test_each_node_gets_pools_from_its_own_cpus_and_gpus(tiny_dir):
    # the tiny model: encode asks 0.45 of a GPU, answer 0.55
    nodes = [Node("a" * 56, 16.0, 2), Node("b" * 56, 4.0, 1), Node("c" * 56, 6.0, 0), Node("d" * 56, 0.0, 0)]
    placed = placement(job_for(tiny_dir), nodes)
    assert counts(placed, "answer") == [2, 1, 0, 0]  # one a GPU
    assert counts(placed, "encode") == [1, 1, 0, 0]  # one a GPU node
    # decode: what the others leave on each node, at most 8 a node (a: 16 - 1.5; b: 4 - 1; c: 6; d: none)
    assert counts(placed, "decode") == [8, 3, 6, 0]
    assert {name: (r.pool_size, r.num_cpus, r.num_gpus) for name, r in placed.stages.items()} == {
        "decode": (17, 1.0, 0.0), "encode": (2, 0.5, 0.45), "answer": (3, 0.5, 0.55)}
    assert placed.describe(nodes) == [
        "placement: decode 17 x (cpu 1, gpu 0), encode 2 x (cpu 0.5, gpu 0.45), "
        "answer 3 x (cpu 0.5, gpu 0.55)",
        "  node aaaaaaaa (16 CPUs, 2 GPUs): decode 8, encode 1, answer 2",
        "  node bbbbbbbb (4 CPUs, 1 GPU): decode 3, encode 1, answer 1",
        "  node cccccccc (6 CPUs, 0 GPUs): decode 6",
        "  node dddddddd (0 CPUs, 0 GPUs): nothing",
    ]


def test_a_cpu_cluster_encodes_and_answers_on_every_node_and_pools_given_are_kept(tiny_dir):
    nodes = [Node("a", 4.0, 0), Node("b", 2.0, 0)]
    placed = placement(job_for(tiny_dir), nodes)
    assert [counts(placed, s) for s in ("decode", "encode", "answer")] == [[3, 1], [1, 1], [1, 1]]
    pinned = placement(job_for(tiny_dir, "resources.answer.pool_size=1", "resources.decode.pool_size=3"),
                       nodes)
    assert (pinned.stages["answer"].pool_size, pinned.stages["decode"].pool_size) == (1, 3)
    assert sum(counts(pinned, "decode")) == 3 and sum(counts(pinned, "answer")) == 1


def test_feasibility_is_checked_node_by_node(tiny_dir):
    two_single_gpu_nodes = [Node("a", 8.0, 1), Node("b", 8.0, 1)]
    # two whole GPUs for one actor: the cluster has two, but no node has both
    with pytest.raises(ConfigError, match=r"answer.num_gpus=2 needs 2 GPUs of the cluster's 2, but not GPU "
                                          r"by GPU .* whole GPUs takes unused ones of one node\)"):
        placement(job_for(tiny_dir, "resources.answer.num_gpus=2", "resources.encode.num_gpus=0"),
                  two_single_gpu_nodes)
    # 3 CPUs for one decoder: the cluster has 6, each node 2
    two_cpu_nodes = [Node("a" * 56, 2.0, 0), Node("b" * 56, 2.0, 0), Node("c" * 56, 2.0, 0)]
    with pytest.raises(ConfigError, match=r"resources.decode: one actor asks 3 CPUs and 0 GPUs, more than "
                                          r"any one node has \(the largest: node aaaaaaaa \(2 CPUs, 0 "
                                          r"GPUs\); an actor cannot span nodes\)"):
        placement(job_for(tiny_dir, "resources.decode.num_cpus=3"), two_cpu_nodes)
    # each actor fits a node, and 4 CPUs of 4 are asked, but not node by node (1.5 + 1.5 + 1 on 2 + 2)
    overrides = [f"resources.{s}.{k}" for s in ("encode", "answer") for k in ("num_cpus=1.5", "pool_size=1")]
    with pytest.raises(ConfigError, match=r"resources.decode: 1 of its 1 actors fit no node beside the other "
                                          r"stages' actors"):
        placement(job_for(tiny_dir, *overrides, "resources.decode.pool_size=1"),
                  [Node("a", 2.0, 0), Node("b", 2.0, 0)])


def test_gpu_fractions_pack_node_by_node_the_way_ray_spreads_them():
    def asks(*gpus: float) -> list[tuple[str, int]]:
        return [(f"actor {i}", round(g * RAY_UNITS)) for i, g in enumerate(gpus)]

    # one node: the second 0.1 goes to the GPU the first left tightest, and a 0.9 finds no room
    assert unplaced_gpu_actor(asks(0.1, 0.1, 0.9, 0.9), gpus=[2]) == "actor 3"
    # two nodes: each in turn, so each GPU holds a 0.1 and a 0.9
    assert unplaced_gpu_actor(asks(0.1, 0.1, 0.9, 0.9), gpus=[1, 1]) is None
    assert unplaced_gpu_actor(asks(2), gpus=[1, 1]) == "actor 0"  # whole GPUs of one node
    assert unplaced_gpu_actor(asks(2), gpus=[1, 2]) is None


def test_a_lost_node_is_logged_and_stops_the_job_when_no_node_left_holds_a_stage(tiny_dir, caplog):
    gpu_node, cpu_node = Node("g" * 56, 4.0, 1), Node("c" * 56, 4.0, 0)
    job = job_for(tiny_dir)
    stages = placement(job, [gpu_node, cpu_node]).stages
    alive = [gpu_node, cpu_node]
    watch = NodeWatch(job, stages, [gpu_node, cpu_node], lambda: list(alive))
    watch.check()  # all there: nothing to say
    alive.remove(cpu_node)
    with caplog.at_level(logging.WARNING, logger="pipelines.runner"), pytest.raises(NodesLost) as lost:
        watch.check()  # the pools planned for two nodes no longer fit on the one left: run_ray re-plans
    assert [r.getMessage() for r in caplog.records] == [
        "node cccccccc (4 CPUs, 0 GPUs) left the cluster: the nodes left cannot hold the running pools; the "
        "clips not yet finished are placed anew"]
    assert lost.value.nodes == [cpu_node] and str(lost.value) == "node cccccccc (4 CPUs, 0 GPUs)"

def test_rows_are_watched_while_none_arrive():
    stuck, resumed = threading.Event(), threading.Event()

    def rows():  # two rows, then Ray Data waiting for an actor that never comes (till the test lets it go)
        yield {"n": 1}
        yield {"n": 2}
        stuck.wait(600)  # a hang guard only
        resumed.set()
        yield {"n": 3}

    checks = []

    def check() -> None:
        checks.append(1)
        if len(checks) == 3:
            raise NodeLostError("gone")

    got = []
    with pytest.raises(NodeLostError, match="gone"):
        for row in rows_watched(rows(), check, every=0.05):
            got.append(row["n"])
    assert got == [1, 2] and not resumed.is_set()  # checked while stuck, not after the wait
    stuck.set()
    assert list(rows_watched(iter([{"n": 1}]), check, every=600)) == [{"n": 1}]  # ends with its rows


def test_output_rows_carry_the_nodes_that_ran_their_stages():
    questions = {"q1": Question(id="q1", video="v.mp4", question="What?")}
    video_row = {"ids": ["q1"], "predictions": ["a cat"], "decode_node": "n1", "encode_node": "n2",
                 "answer_node": "n2"}
    (row,) = question_rows(video_row, questions)
    assert (row["decode_node"], row["encode_node"], row["answer_node"]) == ("n1", "n2", "n2")
    (local,) = question_rows({"ids": ["q1"], "predictions": ["a cat"]}, questions)  # runner=local: no node
    assert "answer_node" not in local
