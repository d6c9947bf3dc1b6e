"""The fold patterns, one module each, in the order they run.

Each pass reads: match → preconditions (each a human reason or None) → rewrite (the math in
:mod:`bnfold.numerics`) → report entry. The folding passes run in this order, repeatedly,
until none changes the graph (a fold can expose another: Conv → Mul → BN folds the Mul
first, then the BN); ``rewrite`` then handles whatever BN is left. Importing this package
has no side effects.
"""

from bnfold.passes import chain, conv, conv_transpose, forward, gemm, matmul, rewrite

FOLD_PASSES = (conv.PASS, conv_transpose.PASS, gemm.PASS, matmul.PASS, chain.PASS, forward.PASS)
FINAL_PASSES = (rewrite.PASS,)
PATTERNS = tuple(p.name for p in (*FOLD_PASSES, *FINAL_PASSES))

__all__ = ["FOLD_PASSES", "FINAL_PASSES", "PATTERNS"]
