"""The benchmarks measure what they say: a child's peak memory is its own."""

from __future__ import annotations

import numpy as np

from agent_forge.evomerge.benchmarks import bench_merge


def test_merge_benchmark_peak_rss_is_the_childs_own_not_the_parents(tmp_path):
    """The parent holds 2 GB while the child merges tiny models: the child's figure must not
    include it (``ru_maxrss`` does — the kernel carries the spawning address space's peak over
    to the child)."""
    held = np.ones(2 * 2**30, dtype=np.uint8)  # touched: resident in this (parent) process
    result = bench_merge("tiny", tmp_path, threads=1, mergekit=False)
    assert held[-1] == 1
    child = result["evomerge"]["peak_rss"]
    assert 50 * 2**20 < child < 2**30, child / 2**20
    assert result["evomerge"]["seconds"] > 0 and result["read_floor_s"] > 0
