"""The benchmark of issue 8: bnfold against the load+save floor and its peers.

``python -m bench`` (see :mod:`bench.__main__`) builds the workloads (:mod:`bench.workloads`),
runs every tool as its own process (:mod:`bench.tools`, :mod:`bench.run_tool`), measures each
output (:mod:`bench.metrics`, float64 reference in :mod:`bench.reference64`) and prints one
Markdown table (:mod:`bench.report`). ``python -m bench.profile`` profiles ``bnfold fold``.
The latest results and the command that produced them are in ``bench/RESULTS.md``.
"""
