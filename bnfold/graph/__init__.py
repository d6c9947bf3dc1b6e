"""A small index over ONE graph body (GraphProto or FunctionProto) and how to walk nested ones."""

from bnfold.graph.index import GraphIndex, NameSet
from bnfold.graph.walk import all_names, free_names, subgraphs

__all__ = ["GraphIndex", "NameSet", "all_names", "free_names", "subgraphs"]
