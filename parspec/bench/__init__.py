"""Benchmarks: the harness, the 8B-shaped expansion of the reference pair, peers, roofline, plots."""
