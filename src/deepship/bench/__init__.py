"""Benchmarks and load generators, one module per `deepship bench <name>`, and the one parser for them (`cli`).

Every figure comes with a baseline measured in the same process, because shared machines are noisy and only ratios
travel. Library modules never import this package; the command line is its only entry. Importing it is cheap:
each benchmark loads torch, onnxruntime or the server only when it runs.
"""

from deepship.bench.common import print_results, rt_polarity_rows, write_csv_splits
from deepship.bench.export import bench_export

__all__ = ["bench_export", "print_results", "rt_polarity_rows", "write_csv_splits"]
