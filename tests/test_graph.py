"""Tests for funnel.graph: stage-list problems and topological order."""

from __future__ import annotations

import copy

import pytest

from funnel.errors import ConfigError
from funnel.graph import Edge, FunnelGraph, graph_problems
from funnel.spec import config_from_dict

FIVE = [
    ("click", "click", None),
    ("cart", "cart", "click"),
    ("checkout", "checkout", "cart"),
    ("pay", "pay", "checkout"),
    ("review", "review", "pay"),
]


def triples(specs):
    return [(n, lab, a) for n, lab, a in specs]


def test_valid_chain_has_no_problems():
    assert graph_problems(triples(FIVE)) == []


def test_duplicate_stage_names_are_reported():
    problems = graph_problems([("click", "click", None), ("click", "click2", None)])
    assert problems == ["funnel.stages[1].name: stage name 'click' is used twice; stage names must be unique."]


def test_unknown_parent_suggests_the_closest_stage():
    (problem,) = graph_problems([("click", "click", None), ("conversion", "conversion", "clik")])
    assert problem.startswith("funnel.stages[1].after: stage 'conversion' follows 'clik', which is not a stage.")
    assert 'Did you mean "click"?' in problem


def test_two_stage_cycle_is_reported_with_its_path():
    problems = graph_problems([("a", "a", "b"), ("b", "b", "a")])
    assert any("the stages a -> b -> a form a cycle" in p for p in problems)
    assert any("no stage follows the impression" in p for p in problems)


def test_cycle_below_a_valid_root_is_reported_once():
    problems = graph_problems([("root", "root", None), ("a", "a", "b"), ("b", "b", "a")])
    assert len([p for p in problems if "form a cycle" in p]) == 1
    assert not any("no stage follows the impression" in p for p in problems)


def test_stage_following_itself_is_reported():
    problems = graph_problems([("root", "root", None), ("a", "a", "a")])
    assert "funnel.stages[1].after: stage 'a' cannot follow itself." in problems


def test_label_column_used_twice_is_reported():
    (problem,) = graph_problems([("click", "y", None), ("conversion", "y", "click")])
    assert problem.startswith("funnel.stages[1].label: column 'y' is already the label of stage 'click'")


def test_no_root_stage_is_reported():
    problems = graph_problems([("a", "a", "x"), ("b", "b", "a")])
    assert "funnel.stages: no stage follows the impression; give the first stage no `after`." in problems


def test_empty_stage_list_is_reported():
    assert "at least one stage" in graph_problems([])[0]


def test_chain_raises_value_error_listing_problems():
    with pytest.raises(ValueError) as err:
        FunnelGraph.chain([("a", "a", "a"), ("a", "b", "a")])
    msg = str(err.value)
    assert "'a' is used twice" in msg and "cannot follow itself" in msg and "no stage follows" in msg


def test_five_stage_chain_orders_stages_and_paths():
    graph = FunnelGraph.chain(FIVE)
    assert graph.names == ["click", "cart", "checkout", "pay", "review"]
    assert graph.path("review") == ["click", "cart", "checkout", "pay", "review"]
    assert graph.path("cart") == ["click", "cart"]
    assert graph.path("click") == ["click"]
    assert graph.index("pay") == 3
    assert graph.stage("pay").after == "checkout"
    assert not hasattr(graph.stage("pay"), "weight")  # loss weights belong to the weighting, not the graph
    # one tower per stage, named after it, fed by the parent stage
    assert graph.towers == graph.names
    assert graph.stage("cart").edges == (Edge(tower="cart", source="click"),)
    assert graph.stage("click").edges == (Edge(tower="click", source=None),)


def test_stages_listed_child_first_are_put_in_parent_order():
    shuffled = [FIVE[4], FIVE[2], FIVE[0], FIVE[3], FIVE[1]]
    graph = FunnelGraph.chain(shuffled)
    assert graph.names == ["click", "cart", "checkout", "pay", "review"]
    assert graph.path("review") == ["click", "cart", "checkout", "pay", "review"]


def test_branching_stages_order_parents_first():
    graph = FunnelGraph.chain(
        [
            ("buy", "buy", "cart"),
            ("cart", "cart", "click"),
            ("share", "share", "click"),
            ("click", "click", None),
        ]
    )
    names = graph.names
    assert names[0] == "click"
    assert names.index("cart") < names.index("buy")
    assert graph.path("share") == ["click", "share"]


def test_unknown_stage_lookup_raises_key_error():
    with pytest.raises(KeyError):
        FunnelGraph.chain(FIVE).stage("nope")


def test_graph_problems_reach_the_config_error():
    raw = {
        "data": {"train": "t.csv"},
        "features": [{"name": "u", "kind": "categorical"}],
        "funnel": {"stages": [{"name": "a", "after": "b"}, {"name": "b", "after": "a"}]},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(copy.deepcopy(raw))
    assert "a -> b -> a form a cycle" in str(err.value)
