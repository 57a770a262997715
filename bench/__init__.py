"""m2f.bench: parity and GPU-throughput harnesses. Raw results are committed under bench/results/."""
