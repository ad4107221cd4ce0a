"""The process memory tuning of `mtseg` and the worker process: freed blocks reused, nested levels safe."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from MultiTaskSegLib import process_memory
from MultiTaskSegLib.process_memory import allow_malloc_tuning, reuse_freed_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or process_memory._glibc() is None, reason="glibc's malloc only"
)
_BLOCK = 64 << 20  # above glibc's default mmap threshold: served by fresh pages unless the tuning is on


def _faults_of_allocations(times: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = np.ones(_BLOCK, np.uint8)  # touches every page
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.fixture
def tuning():
    allow_malloc_tuning(True)
    yield
    allow_malloc_tuning(False)


def test_freed_blocks_are_reused_only_inside_the_context(tuning) -> None:
    pages = _BLOCK // resource.getpagesize()
    outside = _faults_of_allocations(4)
    with reuse_freed_memory():
        inside = _faults_of_allocations(4)
    assert outside >= 3 * pages  # every allocation faults its pages in again
    assert inside <= 1.5 * pages  # the first one only; the others reuse it


def test_a_nested_level_does_not_hand_memory_back_halfway(tuning) -> None:
    pages = _BLOCK // resource.getpagesize()
    with reuse_freed_memory():
        _faults_of_allocations(1)
        with reuse_freed_memory():  # the sliding window's own level inside a whole prediction
            _faults_of_allocations(1)
        after_inner = _faults_of_allocations(2)
    assert after_inner <= 0.5 * pages


def test_nothing_changes_unless_the_process_owner_allows_it() -> None:
    allow_malloc_tuning(False)
    setter = np._core.multiarray._set_madvise_hugepage
    setter(False)  # count 4 KB pages (a huge page is one fault for 512 of them)
    try:
        pages = _BLOCK // resource.getpagesize()
        with reuse_freed_memory():
            faults = _faults_of_allocations(3)
    finally:
        setter(True)
    assert faults >= 2 * pages


def test_numpy_huge_pages_follow_the_switch() -> None:
    setter = np._core.multiarray._set_madvise_hugepage  # returns the previous setting
    allow_malloc_tuning(True)
    assert setter(False) is False  # turned off by the tuning
    allow_malloc_tuning(False)
    assert setter(True) is True  # numpy's default again
