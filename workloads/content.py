"""What a guest's pages hold: the bytes a workload writes beside its per-page counter, and what
its memory holds before the workload starts (`fill`).

Why this exists: zero-page detection, XBZRLE and compression are only as meaningful as the
memory they are given. A fresh guest is all zeros (`fill = "zero"`, as a guest that has just
booted); `random` is what guestperf's stress program leaves behind (it touches every page
first, then XORs random buffers into them: incompressible); `text` is compressible as real
data is (measured here on 512 KiB of it: zlib level 1 about 2.5x, zstd level 1 about 3x).

Text is words drawn from a fixed vocabulary of 4096 pseudo-words (English letter frequencies,
geometric lengths) with Zipf frequencies, separated by spaces, generated vectorised: a
stream of word ids, their lengths summed, the bytes gathered in one go. Every draw comes from
the caller's generator, so content is as deterministic as the workload that asks for it.

Word 0 of each page is never written here: it is the workload's counter
(`workloads.patterns`), which the lost-write check sums.
"""

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from nodes.errors import ConfigError

if TYPE_CHECKING:
    from workloads.guest import Guest

FILLS = ("zero", "random", "text")
COUNTER_BYTES = 8               # word 0 of a page: the workload's per-page counter
_VOCABULARY_WORDS = 4096
_TABLE = 1 << 16                # word ids drawn through a table of this many entries
_LETTERS = b"etaoinshrdlcumwfgypbvkjxqz"
_LETTER_SHARES = (12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4,
                  2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07)


def check_fill(fill: str) -> str:
    if fill not in FILLS:
        raise ConfigError(f"unknown fill {fill!r}; use one of {', '.join(FILLS)}")
    return fill


@cache
def _vocabulary() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(word bytes back to back, word starts, word lengths with their space, id table, mean
    length of a drawn word): the same for every process (a fixed seed), made once."""
    rng = np.random.Generator(np.random.PCG64(0x7E57))
    letters = np.frombuffer(_LETTERS, np.uint8)
    shares = np.array(_LETTER_SHARES) / sum(_LETTER_SHARES)
    lengths = np.clip(rng.geometric(0.22, _VOCABULARY_WORDS), 1, 12)
    body = rng.choice(letters, int(lengths.sum()), p=shares)
    ends = np.cumsum(lengths)
    words = np.insert(body, ends, ord(" "))              # a space after every word
    with_space = (lengths + 1).astype(np.int32)
    starts = np.concatenate(([0], np.cumsum(with_space)[:-1])).astype(np.int32)
    zipf = 1.0 / np.arange(1, _VOCABULARY_WORDS + 1)
    counts = np.maximum(1, np.round(zipf / zipf.sum() * _TABLE)).astype(np.int64)
    table = np.resize(np.repeat(np.arange(_VOCABULARY_WORDS, dtype=np.int32), counts), _TABLE)
    return words, starts, with_space, table, float(with_space[table].mean())


def text_bytes(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """(rows, width) uint8 of space-separated Zipf words, one stream cut into rows."""
    total = rows * width
    if total == 0:
        return np.zeros((rows, width), np.uint8)
    words, starts, lengths, table, mean = _vocabulary()
    ids = table[rng.integers(0, _TABLE, int(total / mean * 1.05) + 64, dtype=np.int32)]
    sizes = lengths[ids]
    while int(sizes.sum()) < total:                      # rare: top up
        more = table[rng.integers(0, _TABLE, len(ids) // 10 + 64, dtype=np.int32)]
        ids = np.concatenate((ids, more))
        sizes = lengths[ids]
    ends = np.cumsum(sizes, dtype=np.int64)
    keep = int(np.searchsorted(ends, total)) + 1
    ids, sizes, ends = ids[:keep], sizes[:keep], ends[:keep]
    index = np.repeat(starts[ids] - (ends - sizes), sizes) + np.arange(int(ends[-1]))
    return words[index[:total]].reshape(rows, width)


def random_bytes(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(rows * width), np.uint8).reshape(rows, width)


def content(fill: str, rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """Fresh bytes drawn like `fill`: text-like for text, random otherwise (a zero-filled
    guest's writes still write something)."""
    return text_bytes(rng, rows, width) if fill == "text" else random_bytes(rng, rows, width)


def fill(guest: "Guest", kind: str, rng: np.random.Generator, data_pages: int,
         page_size: int, batch_pages: int = 1024) -> None:
    """Write every data page's bytes but its counter with content drawn like `kind`; zero
    writes nothing (a fresh guest is zero already)."""
    if kind == "zero":
        return
    width = page_size - COUNTER_BYTES
    with guest.lock:
        for start in range(0, data_pages, batch_pages):
            pfns = np.arange(start, min(start + batch_pages, data_pages),
                             dtype=np.int64) + guest.pfn_base
            guest.write_bytes(pfns, COUNTER_BYTES, content(kind, rng, len(pfns), width))
