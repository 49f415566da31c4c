"""mmkit's benchmark suite: `python -m bench` runs every part and writes bench/results/report.{md,json}.

One module per part, each with a `run(quick) -> dict` and a command line of its own
(`python -m bench.overhead`, ...): overhead, data_share, latency, planner_accuracy, speedups, gpu.
bench/linear_probe.py (a script) and bench.continual (`python -m bench.continual`) are about learning, not speed.
"""
