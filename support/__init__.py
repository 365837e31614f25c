"""What the tests and the benchmarks share: the suite's settings, servers as subprocesses, the graph
wiped and compared with a full recompute, and the exactness soak."""
