"""The benchmarks (``python -m tools.bench``; see ``tools/bench/__main__.py`` and BENCHMARKS.md).

The result schema is what other code reads: ``BENCHMARKS`` (the benchmarks that write a result),
``validate_result`` (the shape check) and its ``ResultError``.
"""

from tools.bench.results import BENCHMARKS, ResultError, validate_result

__all__ = ["BENCHMARKS", "ResultError", "validate_result"]
