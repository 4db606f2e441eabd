"""The trace file: how an unmodified program dirtied its memory, recorded once
(`migbed trace record`) and replayed into any guest (`workloads.tracereplay`).

Why a format of our own: a trace is input (users share them, the package ships some), so its
decoder must bound every length before it allocates and refuse a truncated or forged file in
one line; and it must be compact (a few MiB for a minute of a busy program), which delta-coded
page numbers under zstandard give. Pure: no processes, no sockets, so `workloads` replays it.

Layout (little-endian):

    magic      8 bytes  b"MIGBTRC\\0"
    version    u16      FORMAT_VERSION
    flags      u16      0
    header     u32      length of the JSON header that follows (<= MAX_HEADER_BYTES)
    body_raw   u64      length of the body once decompressed (<= MAX_BODY_BYTES)
    body_crc   u32      zlib.crc32 of the decompressed body
    (JSON header: program, argv, machine, interval_seconds, children, page_size,
     region_pages, intervals, page_writes, samples, duration_seconds, ended, recorded_at)
    body       the rest of the file: one zstandard frame of
               times    u64 x intervals   microseconds since the start, delta-coded
               counts   u32 x intervals   pages written in each interval
               pages    u32 x page_writes each interval's pages ascending, delta-coded
                                          within the interval (its first from 0)
               samples  SAMPLE_DTYPE x samples  content of sampled written pages

A sample is one written page read right after a scan: whether it was all zero, its size
compressed alone (zstd level 1) and, when the same page was sampled before, the size of the
XBZRLE encoding of the change (`delta_bytes`, -1 when it was not): the figures zero-page
detection, compression and XBZRLE depend on, without storing the memory.
"""

import json
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import zstandard

from nodes.errors import ConfigError

MAGIC = b"MIGBTRC\0"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sHHIQI")
MAX_HEADER_BYTES = 64 << 10
MAX_BODY_BYTES = 1 << 30           # decompressed: 256 M page writes, a bound, not a promise
MAX_REGION_PAGES = 1 << 32
MAX_PAGE_BYTES = 1 << 16
SAMPLE_DTYPE = np.dtype([("interval", "<u4"), ("page", "<u4"), ("zero", "u1"),
                         ("compressed_bytes", "<u4"), ("delta_bytes", "<i4")])
TRACE_SUFFIX = ".mbtrace"
SHIPPED_DIR = Path(__file__).resolve().parent / "traces"

# The header's keys and their types (JSON); `machine` is a dict of strings and numbers.
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "program": (str,), "argv": (list,), "machine": (dict,), "interval_seconds": (int, float),
    "children": (int,), "page_size": (int,), "region_pages": (int,), "intervals": (int,),
    "page_writes": (int,), "samples": (int,), "duration_seconds": (int, float),
    "ended": (str,), "recorded_at": (str,)}


class TraceFormatError(ConfigError):
    """A trace file is truncated, forged, of another version, or not a trace at all."""


@dataclass(frozen=True)
class Trace:
    """A decoded trace: interval i ended at `times_seconds[i]` (since the start) and wrote
    `counts[i]` pages, `pages[offsets[i]:offsets[i+1]]` (region page indices, ascending)."""
    header: dict
    times_seconds: np.ndarray          # float64, per interval, non-decreasing
    counts: np.ndarray                 # int64, per interval
    pages: np.ndarray                  # int64, all intervals' pages back to back
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, SAMPLE_DTYPE))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.counts))).astype(np.int64)

    @property
    def interval_seconds(self) -> float:
        return float(self.header["interval_seconds"])

    @property
    def page_size(self) -> int:
        return int(self.header["page_size"])

    @property
    def duration_seconds(self) -> float:
        return float(self.header["duration_seconds"])

    def interval_pages(self, i: int) -> np.ndarray:
        o = self.offsets
        return self.pages[o[i]:o[i + 1]]


def make_trace(header: dict, times_seconds: "np.ndarray | list", pages_per_interval: list,
               samples: np.ndarray | None = None) -> Trace:
    """A Trace from per-interval page arrays (each made unique and sorted here); the
    header's counts are filled in. What the recorder and tests build traces with."""
    per = [np.unique(np.asarray(p, np.int64)) for p in pages_per_interval]
    samples = np.zeros(0, SAMPLE_DTYPE) if samples is None else samples.astype(SAMPLE_DTYPE)
    counts = np.array([len(p) for p in per], np.int64)
    pages = np.concatenate(per) if per else np.zeros(0, np.int64)
    times = np.asarray(times_seconds, np.float64)
    head = {**header, "intervals": len(per), "page_writes": int(counts.sum()),
            "samples": len(samples)}
    trace = Trace(head, times, counts, pages, samples)
    _check_arrays(trace)
    return trace


# -- encoding -----------------------------------------------------------------------------------
def encode(trace: Trace, level: int = 9) -> bytes:
    """The file's bytes for `trace`."""
    _check_header(trace.header)
    _check_arrays(trace)
    micros = np.round(trace.times_seconds * 1e6).astype(np.uint64)
    time_deltas = np.diff(micros, prepend=np.uint64(0))
    deltas = trace.pages.copy()
    starts = trace.offsets[:-1][trace.counts > 0]
    deltas[1:] -= trace.pages[:-1]
    deltas[starts] = trace.pages[starts]           # each interval's first page from 0
    body = b"".join((time_deltas.astype("<u8").tobytes(), trace.counts.astype("<u4").tobytes(),
                     deltas.astype("<u4").tobytes(), trace.samples.tobytes()))
    head = json.dumps(trace.header, sort_keys=True).encode()
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, len(head), len(body), zlib.crc32(body))
    return fixed + head + zstandard.ZstdCompressor(level=level).compress(body)


# -- decoding -----------------------------------------------------------------------------------
def decode(data: bytes, what: str = "trace") -> Trace:
    """The trace in `data`; TraceFormatError (one line, naming `what`) if it is not one."""
    if len(data) < _FIXED.size:
        raise TraceFormatError(f"{what} is truncated: {len(data)} bytes, not even a header")
    magic, version, _flags, head_len, raw_len, crc = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise TraceFormatError(f"{what} is not a migbed trace (no {MAGIC[:7].decode()} magic)")
    if version != FORMAT_VERSION:
        raise TraceFormatError(f"{what} is trace format version {version}; this migbed "
                               f"reads version {FORMAT_VERSION}")
    if head_len > MAX_HEADER_BYTES or _FIXED.size + head_len > len(data):
        raise TraceFormatError(f"{what} is truncated or forged: a header of {head_len} bytes")
    header = _read_header(data[_FIXED.size:_FIXED.size + head_len], what)
    want = (8 + 4) * header["intervals"] + 4 * header["page_writes"] \
        + SAMPLE_DTYPE.itemsize * header["samples"]
    if raw_len != want or raw_len > MAX_BODY_BYTES:
        raise TraceFormatError(f"{what} is forged: its body says {raw_len} bytes, its header "
                               f"{want} (at most {MAX_BODY_BYTES})")
    body = _decompress(data[_FIXED.size + head_len:], raw_len, what)
    if zlib.crc32(body) != crc:
        raise TraceFormatError(f"{what} is corrupt: its body's checksum does not match")
    return _read_body(header, body, what)


def _decompress(blob: bytes, raw_len: int, what: str) -> bytes:
    try:
        body = zstandard.ZstdDecompressor().decompress(blob, max_output_size=max(raw_len, 1))
    except zstandard.ZstdError as exc:
        raise TraceFormatError(f"{what} is truncated or corrupt: {exc}") from None
    if len(body) != raw_len:
        raise TraceFormatError(f"{what} is truncated: {len(body)} of {raw_len} body bytes")
    return body


def _read_header(raw: bytes, what: str) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TraceFormatError(f"{what} has an unreadable header") from None
    try:
        _check_header(header)
    except ConfigError as exc:
        raise TraceFormatError(f"{what}: {exc}") from None
    return header


def _check_header(h: object) -> None:
    if not isinstance(h, dict):
        raise TraceFormatError("the header is not a JSON object")
    for key, types in _HEADER_TYPES.items():
        v = h.get(key)
        if not isinstance(v, types) or isinstance(v, bool):
            raise TraceFormatError(f"header field {key!r} is missing or not a "
                                   f"{types[0].__name__}")
    if not all(isinstance(a, str) for a in h["argv"]):
        raise TraceFormatError("header field 'argv' is not a list of strings")
    checks = (("interval_seconds", 0 < h["interval_seconds"] <= 3600),
              ("page_size", 512 <= h["page_size"] <= MAX_PAGE_BYTES),
              ("region_pages", 0 < h["region_pages"] <= MAX_REGION_PAGES),
              ("duration_seconds", 0 <= h["duration_seconds"] <= 1e7),
              ("children", h["children"] >= 0))
    for key, ok in checks + tuple((k, h[k] >= 0) for k in ("intervals", "page_writes",
                                                             "samples")):
        if not ok:
            raise TraceFormatError(f"header field {key!r} = {h[key]!r} is out of range")


def _read_body(header: dict, body: bytes, what: str) -> Trace:
    n, w = header["intervals"], header["page_writes"]
    at = 0

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal at
        a = np.frombuffer(body, dtype, count, at)
        at += a.nbytes
        return a

    micros = np.cumsum(take("<u8", n), dtype=np.uint64)
    counts = take("<u4", n).astype(np.int64)
    deltas = take("<u4", w).astype(np.int64)
    samples = np.frombuffer(body, SAMPLE_DTYPE, header["samples"], at).copy()
    if int(counts.sum()) != w:
        raise TraceFormatError(f"{what} is forged: its intervals hold {int(counts.sum())} "
                               f"pages, its header says {w}")
    pages = _undelta(deltas, counts)
    trace = Trace(header, micros.astype(np.float64) / 1e6, counts, pages, samples)
    try:
        _check_arrays(trace)
    except ConfigError as exc:
        raise TraceFormatError(f"{what} is forged: {exc}") from None
    return trace


def _undelta(deltas: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Within-interval cumulative sums of the deltas (each interval restarts from 0)."""
    total = np.cumsum(deltas)
    starts = (np.cumsum(counts) - counts)[counts > 0]
    before = np.zeros(len(deltas), np.int64)
    before[starts] = total[starts] - deltas[starts]
    return total - np.maximum.accumulate(before) if len(deltas) else deltas


def _check_arrays(t: Trace) -> None:
    n, region, h = len(t.counts), t.header["region_pages"], t.header
    if len(t.times_seconds) != n or h.get("intervals", n) != n:
        raise TraceFormatError(f"{len(t.times_seconds)} times for {n} intervals")
    if n and (np.any(np.diff(t.times_seconds) < 0) or t.times_seconds[0] < 0):
        raise TraceFormatError("interval times go backwards")
    if len(t.pages) and (t.pages.min() < 0 or t.pages.max() >= region):
        raise TraceFormatError(f"a page number lies outside the region of {region} pages")
    o = t.offsets
    inside = np.ones(len(t.pages), bool)
    inside[o[:-1][t.counts > 0]] = False
    if np.any(np.diff(t.pages, prepend=-1)[inside] <= 0):
        raise TraceFormatError("an interval's pages are not strictly ascending")
    s = t.samples
    if len(s) and (int(s["interval"].max()) >= max(n, 1) or int(s["page"].max()) >= region
                   or int(s["compressed_bytes"].max()) > 2 * MAX_PAGE_BYTES
                   or int(s["delta_bytes"].min()) < -1):
        raise TraceFormatError("a content sample is out of range")


# -- files and shipped traces -------------------------------------------------------------------
def shipped_traces() -> dict[str, Path]:
    """The traces the package ships (`workloads/traces/NAME.mbtrace`), by name."""
    return {p.name[:-len(TRACE_SUFFIX)]: p for p in sorted(SHIPPED_DIR.glob("*" + TRACE_SUFFIX))}


def trace_path(name_or_path: str) -> Path:
    """A shipped trace's path by its name, else the file named; ConfigError (one line) if
    neither exists."""
    shipped = shipped_traces()
    if name_or_path in shipped:
        return shipped[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    names = ", ".join(shipped) or "none"
    raise ConfigError(f"no trace file {name_or_path!r} and no shipped trace of that name "
                      f"(shipped: {names}; `migbed trace list`)")


def read_trace_bytes(name_or_path: str, max_bytes: int = 64 << 20) -> bytes:
    """The bytes of a trace file (by shipped name or path), bounded and checked to decode
    (once per file version: a sweep makes many specs of one trace)."""
    path = trace_path(name_or_path)
    st = path.stat()
    return _read_checked(str(path), st.st_mtime_ns, st.st_size, max_bytes)


@lru_cache(maxsize=16)
def _read_checked(path_text: str, _mtime_ns: int, size: int, max_bytes: int) -> bytes:
    path = Path(path_text)
    if size > max_bytes:
        raise TraceFormatError(f"{path} is {size} bytes; a trace file may be at most "
                               f"{max_bytes}")
    data = path.read_bytes()
    decode(data, str(path))
    return data


def load_trace(name_or_path: str) -> Trace:
    return decode(read_trace_bytes(name_or_path), name_or_path)
