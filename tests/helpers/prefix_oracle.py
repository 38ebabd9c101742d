"""The prefix re-derived independently: networkx on a plain ``torch.fx.symbolic_trace``."""
from __future__ import annotations

import networkx as nx
import torch.fx as fx
from torch import nn

from .references import LAYER_CLASSES


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules):
        super().__init__()
        self.leaf_names = set(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_names or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, leaf_modules) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    return fx.GraphModule(model, tracer.trace(model))


def expected_prefix(model: nn.Module, local_layers, leaf_modules=()) -> tuple[set[str], set[str]]:
    """The prefix of docs/DESIGN.md §1.2, re-derived: a compute node is in the prefix iff it is not an SGD layer
    call, all its inputs are in the prefix or are sources, and it is a local layer call, an ancestor
    of one (not through an SGD call), or a descendant of either (the documented refinement that leaves t=0
    untouched and keeps input-only branches that feed no local layer on SGD). A call of a module that is
    no plain layer but holds conv/linear modules (``leaf_modules`` names, qualified) counts as an SGD
    layer call. Returns (prefix, crossing) node names."""
    gm = _trace(model, leaf_modules)
    nodes = list(gm.graph.nodes)
    local = set(local_layers)
    local_sites, sgd_sites = set(), set()
    for n in nodes:
        if n.op != "call_module":
            continue
        module = gm.get_submodule(n.target)
        if isinstance(module, LAYER_CLASSES) and n.target in local:
            local_sites.add(n.name)
        elif any(isinstance(m, LAYER_CLASSES) for m in module.modules()):
            sgd_sites.add(n.name)
    dag = nx.DiGraph()
    dag.add_nodes_from(n.name for n in nodes)
    dag.add_edges_from((i.name, n.name) for n in nodes for i in n.all_input_nodes)
    upstream = dag.subgraph(n for n in dag if n not in sgd_sites)   # feeding a local layer through an SGD call
    sources = {n.name for n in nodes if n.op in ("placeholder", "get_attr")}
    seeds = set(local_sites)
    for s in local_sites:
        seeds |= nx.ancestors(upstream, s) - sources
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


def prefix_parameters(model: nn.Module, prefix: set[str], leaf_modules=()) -> set[str]:
    """Qualified names of the parameters used only by prefix nodes of a plain symbolic trace (the
    modules called in the prefix, and attributes read only there, e.g. by a traced-through BatchNorm)."""
    gm = _trace(model, leaf_modules)
    names = set()
    for n in gm.graph.nodes:
        if n.name in prefix and n.op == "call_module":
            names |= {f"{n.target}.{p}" for p, _ in gm.get_submodule(n.target).named_parameters()}
        elif n.op == "get_attr" and n.users and all(u.name in prefix for u in n.users):
            names.add(n.target)
    return names
