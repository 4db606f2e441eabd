"""Zero-page detection on the sender: which of a batch's frames hold nothing but zeros
(QEMU's `buffer_is_zero` in `save_zero_page`).

A cheap first test before a full scan, so round 0 keeps its throughput: four words of each
page (the first two, the middle one, the last) are gathered at once; a page with any of them
set is not zero, which settles almost every page of a guest whose memory has content (the
workloads' counter is word 0, their content starts at word 1). Only the pages that pass the
test are scanned whole, run by run where their frames are adjacent (views, no copy). Frames
that are holes in machine memory (never written) are zero without a look.
"""

import numpy as np

from nodes.xen.memory import MachineMemory


def sample_words(words_per_page: int) -> np.ndarray:
    return np.array(sorted({0, 1, words_per_page // 2, words_per_page - 1}), np.int64)


def zero_frames(memory: MachineMemory, mfns: np.ndarray) -> np.ndarray:
    """One bool per frame of `mfns`: True where the frame is all zeros."""
    if not len(mfns):
        return np.zeros(0, bool)
    if len(mfns) == 1:                    # a requested page alone (post-copy): one look
        hole = memory.holes(mfns)
        if not hole[0]:
            hole[0] = not memory.frames[int(mfns[0])].view(np.uint64).any()
        return hole
    hole = memory.holes(mfns)             # zero without a look (a look would allocate them)
    held = np.flatnonzero(~hole)
    if not len(held):
        return hole
    sample = sample_words(memory.words_per_page)
    candidate = ~memory.words[mfns[held, None], sample].any(axis=1)
    maybe = held[candidate]
    zero = np.zeros(len(maybe), bool)
    for at, pages, _ in memory.pieces(mfns[maybe]):
        zero[at:at + len(pages)] = ~pages.view(np.uint64).any(axis=1)
    hole[maybe] = zero
    return hole
