"""The funnel graph: named stages, each reached from an earlier event through edges.

A stage is reached through one or more *edges*. Each edge has its own tower giving
the conditional probability of the stage given the edge's source event, and the
source event is either an earlier stage happening, or (for mutually exclusive
branches, ESM²) an earlier stage *not* happening while its own parent did. The reach
probability of a stage is the sum over its edges of P(source) · p(edge), so chains
(one edge per stage) and branching funnels share one mechanism:

    chain:  P(cvr)  = P(click) · y2
    ESM²:   P(buy)  = P(click ∧ cart) · y3 + P(click ∧ ¬cart) · y4

Sibling stages can form a *group* of mutually exclusive outcomes of their common parent
(cart | wish | neither after a click). Their conditional probabilities come from one softmax
over the members' logits and a fixed 0 logit for "none of them", so they sum to at most one;
a group of one stage is the ordinary sigmoid. A stage ``via`` a group gets one tower per
member plus one for "none": P(buy) = Σ_m P(click ∧ m) · y_m + P(click ∧ none) · y_none.

``after`` is the stage that every path to this stage passes through last; the
conditional probability reported for a stage is P(stage) / P(after).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from funnel.errors import did_you_mean

IMPRESSION = None  # the implicit root event: every row is an impression


@dataclass(frozen=True)
class Edge:
    """One tower feeding a stage: p(stage | source event, x)."""

    tower: str  # name of the tower (unique across the graph)
    source: str | None  # a stage or group name, or None for the impression
    negated: bool = False  # True: the source stage (or every stage of the group) did NOT happen, its parent did


@dataclass(frozen=True)
class Stage:
    name: str
    label: str
    after: str | None
    edges: tuple[Edge, ...]
    group: str | None = None  # mutually exclusive siblings share a group (one softmax)


@dataclass(frozen=True)
class FunnelGraph:
    stages: tuple[Stage, ...]  # topological order: parents before children

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def towers(self) -> list[str]:
        return [e.tower for s in self.stages for e in s.edges]

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group name -> its member stages, in graph order."""
        out: dict[str, list[str]] = {}
        for s in self.stages:
            if s.group is not None:
                out.setdefault(s.group, []).append(s.name)
        return out

    def after_of(self, source: str) -> str | None:
        """The parent of a stage or of a group's members."""
        groups = self.groups
        return self.stage(groups[source][0] if source in groups else source).after

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def path(self, name: str) -> list[str]:
        """Stage names from the first stage down to ``name`` along ``after`` links."""
        out: list[str] = []
        cur: str | None = name
        while cur is not None:
            out.append(cur)
            cur = self.stage(cur).after
        return out[::-1]

    def branch_edges(self, name: str) -> list[Edge]:
        """The edges of a stage reached through branches (empty for a chain stage)."""
        edges = self.stage(name).edges
        return list(edges) if len(edges) > 1 else []

    @classmethod
    def chain(cls, specs: Sequence[tuple[str, str, str | None]]) -> FunnelGraph:
        """Build from ``(name, label, after)`` tuples; raises ValueError listing problems."""
        return cls.build([(n, lab, a, None) for n, lab, a in specs])

    @classmethod
    def from_stages(cls, stages: Sequence) -> FunnelGraph:
        """Build from ``StageSpec``-like objects (name, label_column, after, via, group). The graph
        is the funnel's structure only: loss weights belong to the run's weighting."""
        return cls.build(
            [(s.name, s.label_column, s.after, s.via) for s in stages],
            groups={s.name: s.group for s in stages if s.group is not None},
        )

    @classmethod
    def build(
        cls, specs: Sequence[tuple[str, str, str | None, str | None]], groups: Mapping[str, str] | None = None
    ) -> FunnelGraph:
        """Build from ``(name, label, after, via)`` tuples; ``groups`` maps stage -> group.

        ``via`` names a branch stage B (with the same ``after``): the stage then has two
        towers, one for rows where B happened and one where it did not (ESM²). ``via`` may
        also name a group: one tower per member and one for "none of them".
        """
        groups = dict(groups or {})
        problems = graph_problems([(n, lab, a) for n, lab, a, _ in specs])
        problems += group_problems([(n, a, groups.get(n)) for n, _, a, _ in specs])
        problems += branch_problems([(n, a, v) for n, _, a, v in specs], groups)
        if problems:
            raise ValueError("; ".join(problems))
        members: dict[str, list[str]] = {}
        for n, *_ in specs:
            if n in groups:
                members.setdefault(groups[n], []).append(n)
        by_name = {s[0]: s for s in specs}
        ordered: list[Stage] = []
        done: set[str | None] = {None}
        pending = [s[0] for s in specs]
        while pending:
            for n in list(pending):
                _, lab, a, via = by_name[n]
                via_done = all(m in done for m in members[via]) if via in members else via in done
                if a in done and via_done:
                    if via is None:
                        edges: tuple[Edge, ...] = (Edge(tower=n, source=a),)
                    else:
                        outcomes = members.get(via, [via])
                        edges = (
                            *(Edge(tower=f"{n}@{m}", source=m) for m in outcomes),
                            Edge(tower=f"{n}@not_{via}", source=via, negated=True),
                        )
                    ordered.append(Stage(n, lab, a, edges, groups.get(n)))
                    done.add(n)
                    pending.remove(n)
        return cls(tuple(ordered))


def graph_problems(specs: Sequence[tuple[str, str, str | None]], path: str = "funnel.stages") -> list[str]:
    """Every structural problem of the stage list ``(name, label, after)``, all at once."""
    problems: list[str] = []
    names = [n for n, _, _ in specs]
    if not specs:
        return [f"{path}: the funnel needs at least one stage, e.g. [{{name: click}}]."]
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            problems.append(f"{path}[{i}].name: stage name {n!r} is used twice; stage names must be unique.")
        seen.add(n)
    labels: dict[str, str] = {}
    for i, (n, lab, _) in enumerate(specs):
        if lab in labels:
            problems.append(
                f"{path}[{i}].label: column {lab!r} is already the label of stage {labels[lab]!r}; "
                "each stage needs its own label column."
            )
        labels.setdefault(lab, n)
    for i, (n, _, a) in enumerate(specs):
        if a is not None and a not in seen:
            problems.append(
                f"{path}[{i}].after: stage {n!r} follows {a!r}, which is not a stage.{did_you_mean(a, names)} "
                "Leave `after` out for a stage that follows the impression."
            )
        if a == n:
            problems.append(f"{path}[{i}].after: stage {n!r} cannot follow itself.")
    parent = {n: a for n, _, a in specs}
    reported: set[frozenset[str]] = set()
    for start in names:
        trail: list[str] = []
        cur: str | None = start
        while cur is not None and cur in parent and cur not in trail:
            trail.append(cur)
            cur = parent[cur]
        if cur is not None and cur in trail and len(trail) > 1:
            cycle = trail[trail.index(cur) :]
            key = frozenset(cycle)
            if key not in reported and len(cycle) > 1:
                reported.add(key)
                problems.append(
                    f"{path}: the stages {' -> '.join([*cycle, cur])} form a cycle; "
                    "every chain of `after` links must end at a stage without `after`."
                )
    if not any(a is None for _, _, a in specs):
        problems.append(f"{path}: no stage follows the impression; give the first stage no `after`.")
    return problems


def group_problems(specs: Sequence[tuple[str, str | None, str | None]], path: str = "funnel.stages") -> list[str]:
    """Problems of ``group`` names ``(name, after, group)``: members must be siblings."""
    names = {n for n, _, _ in specs}
    first: dict[str, tuple[str, str | None]] = {}
    problems = []
    for i, (n, a, g) in enumerate(specs):
        if g is None:
            continue
        if g in names:
            problems.append(f"{path}[{i}].group: {g!r} is also a stage name; give the group its own name.")
        elif g in first and first[g][1] != a:
            other, other_after = first[g]
            problems.append(
                f"{path}[{i}].group: {n!r} follows {a!r} but {other!r} of group {g!r} follows {other_after!r}; "
                "a group holds mutually exclusive outcomes of one parent, so give them the same `after`."
            )
        first.setdefault(g, (n, a))
    return problems


def branch_problems(
    specs: Sequence[tuple[str, str | None, str | None]],
    groups: Mapping[str, str] | None = None,
    path: str = "funnel.stages",
) -> list[str]:
    """Problems of ``via`` links ``(name, after, via)``: the branch must be a sibling stage or group."""
    after = {n: a for n, a, _ in specs}
    group_after = {g: after.get(n) for n, g in (groups or {}).items()}
    problems = []
    for i, (n, a, via) in enumerate(specs):
        if via is None:
            continue
        if via in group_after and via not in after:
            if (groups or {}).get(n) == via:
                problems.append(f"{path}[{i}].via: stage {n!r} cannot branch on its own group.")
            elif group_after[via] != a:
                problems.append(
                    f"{path}[{i}].via: the group {via!r} follows {group_after[via]!r} but {n!r} follows {a!r}; "
                    f"a branch splits the rows of `after`, so give {n!r} `after: {group_after[via]}`."
                )
        elif via not in after:
            problems.append(
                f"{path}[{i}].via: {via!r} is not a stage or group.{did_you_mean(via, [*after, *group_after])}"
            )
        elif via == n:
            problems.append(f"{path}[{i}].via: stage {n!r} cannot branch on itself.")
        elif after[via] != a:
            problems.append(
                f"{path}[{i}].via: the branch stage {via!r} follows {after[via]!r} but {n!r} follows {a!r}; "
                f"a branch splits the rows of `after`, so give {via!r} `after: {a}`."
            )
    return problems
