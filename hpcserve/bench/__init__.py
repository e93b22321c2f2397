"""Benchmarks: each returns a dict of numbers; `hpcserve bench ...` prints them."""
