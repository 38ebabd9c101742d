"""The prefix re-derived independently: networkx on a plain ``torch.fx.symbolic_trace``."""
from __future__ import annotations

import networkx as nx
import torch.fx as fx
from torch import nn

from .references import LAYER_CLASSES


def expected_prefix(model: nn.Module, local_layers, leaf_modules=()) -> tuple[set[str], set[str]]:
    """The prefix of docs/DESIGN.md §1.2, re-derived: a compute node is in the prefix iff it is not an SGD layer
    call, all its inputs are in the prefix or are sources, and it is a local layer call, an ancestor
    of one, or a descendant of either (the documented refinement that leaves t=0 untouched and keeps
    input-only branches that feed no local layer on SGD). Returns (prefix, crossing) node names."""
    gm = fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    dag = nx.DiGraph()
    dag.add_nodes_from(n.name for n in nodes)
    dag.add_edges_from((i.name, n.name) for n in nodes for i in n.all_input_nodes)
    local = set(local_layers)
    local_sites, sgd_sites = set(), set()
    for n in nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LAYER_CLASSES):
            (local_sites if n.target in local else sgd_sites).add(n.name)
    sources = {n.name for n in nodes if n.op in ("placeholder", "get_attr")}
    seeds = set(local_sites)
    for s in local_sites:
        seeds |= nx.ancestors(dag, s) - sources
    related = set(seeds)
    for s in seeds:
        related |= nx.descendants(dag, s)
    prefix: set[str] = set()
    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output") or n.name in sgd_sites or n.name not in related:
            continue
        if all(i.name in prefix or i.op in ("placeholder", "get_attr") for i in n.all_input_nodes):
            prefix.add(n.name)
    crossing = {n.name for n in nodes if n.name in prefix and any(u.name not in prefix for u in n.users)}
    return prefix, crossing


def prefix_parameters(model: nn.Module, prefix: set[str]) -> set[str]:
    """Qualified names of the parameters used by prefix nodes of a plain symbolic trace."""
    gm = fx.symbolic_trace(model)
    names = set()
    for n in gm.graph.nodes:
        if n.name in prefix and n.op == "call_module":
            names |= {f"{n.target}.{p}" for p, _ in gm.get_submodule(n.target).named_parameters()}
        elif n.name in prefix and n.op == "get_attr":
            names.add(n.target)
    return names
