"""The Evaluate stage and its relatives: held-out evaluation of a round (evaluation.py) with its referee
(referee.py), validation scoring for keeping the best round (selection.py, the Validate task), and
lm-evaluation-harness benchmarks (benchmarks.py, the Benchmark task). May generate and judge, never trains."""
