"""What crosses the wire, as a migration is told: zero-page detection, XBZRLE, parallel
channels (multifd) and their compression. QEMU's names and defaults, checked as QEMU checks
them (`migrate_params_check`, `migrate_caps_check`), so a bad combination is refused before
anything moves.

- `zero_page_detection`: `none`, `legacy` (the sender's main thread looks at every page) or
  `multifd` (QEMU's default: the channels look, when there are channels; else as legacy).
- `xbzrle_cache_bytes`: XBZRLE on, with a cache of this many bytes: a power of two no smaller
  than a page (QEMU's rule; its default, 64 MiB, is what guestperf uses at 10 % of memory).
- `multifd_channels`: this many more connections carry the pages (QEMU's default 2 when the
  capability is on); `multifd_compression` none, zlib or zstd, at `multifd_zlib_level`
  (0..9) and `multifd_zstd_level` (0..20), QEMU's defaults 1 and 1.
- XBZRLE and multifd together are refused, as QEMU refuses them.

These fields are the `wire` rows of the field table (`nodes.migration.fields`); what they
must agree on with other sections (multifd and post-copy, a cut channel's number) is checked
by `MigrationSettings`.
"""

from nodes.errors import ConfigError
from nodes.migration.fields import (
    COMPRESSIONS,
    LEVELS,
    MAX_MULTIFD_CHANNELS,
    ZERO_PAGE_DETECTIONS,
    settings_section,
)

__all__ = ["COMPRESSIONS", "LEVELS", "MAX_MULTIFD_CHANNELS", "ZERO_PAGE_DETECTIONS",
           "WireSettings"]

DEFAULT_MULTIFD_CHANNELS = 2            # QEMU's multifd-channels
DEFAULT_XBZRLE_CACHE_BYTES = 64 << 20   # QEMU's xbzrle-cache-size
MAX_XBZRLE_CACHE_BYTES = 1 << 40
XBZRLE_MAX_PAGE_SIZE = 8192             # run lengths are ULEB128 of at most 14 bits


def _whole(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{what} must be a whole number from {lo} to {hi}, got {value!r}")
    return value


@settings_section("wire")
class WireSettings:
    """What crosses the wire; its fields are the table's `wire` rows."""

    def __post_init__(self) -> None:
        check(self)


def check(s: WireSettings) -> None:
    """Refuse what QEMU refuses, with how to mend it."""
    if s.zero_page_detection not in ZERO_PAGE_DETECTIONS:
        raise ConfigError(f"unknown zero-page detection {s.zero_page_detection!r}; use one of "
                          f"{', '.join(ZERO_PAGE_DETECTIONS)}")
    if s.xbzrle_cache_bytes is not None:
        n = s.xbzrle_cache_bytes
        if (isinstance(n, bool) or not isinstance(n, int) or n < 512 or n & (n - 1)
                or n > MAX_XBZRLE_CACHE_BYTES):
            raise ConfigError(f"the XBZRLE cache must be a power of two no smaller than a "
                              f"page (as QEMU requires), e.g. 64MiB; got {n!r}")
    if s.multifd_channels is not None:
        _whole(s.multifd_channels, "multifd channels", 1, MAX_MULTIFD_CHANNELS)
    if s.multifd_compression not in COMPRESSIONS:
        raise ConfigError(f"unknown multifd compression {s.multifd_compression!r}; use one of "
                          f"{', '.join(COMPRESSIONS)}")
    for codec, (lo, hi) in LEVELS.items():
        _whole(getattr(s, f"multifd_{codec}_level"), f"the multifd {codec} level", lo, hi)
    if s.multifd_compression != "none" and s.multifd_channels is None:
        raise ConfigError(f"multifd compression {s.multifd_compression} compresses what the "
                          "channels carry: give --multifd-channels N too")
    if s.xbzrle_cache_bytes is not None and s.multifd_channels is not None:
        raise ConfigError("XBZRLE and multifd cannot be used together (QEMU refuses them "
                          "too): drop --xbzrle-cache or --multifd-channels")


def zero_detection_in_channels(s: WireSettings) -> bool:
    """Zero pages found by the channels (multifd detection with channels), not the sender."""
    return s.zero_page_detection == "multifd" and s.multifd_channels is not None


def zero_detection_in_sender(s: WireSettings) -> bool:
    """Zero pages found by the sender's main thread: legacy, or multifd without channels."""
    return s.zero_page_detection != "none" and not zero_detection_in_channels(s)


def compression_level(s: WireSettings) -> int | None:
    if s.multifd_compression == "none":
        return None
    return getattr(s, f"multifd_{s.multifd_compression}_level")


def check_page_size_for_xbzrle(page_size: int) -> None:
    if page_size > XBZRLE_MAX_PAGE_SIZE:
        raise ConfigError(f"XBZRLE needs pages of at most {XBZRLE_MAX_PAGE_SIZE} bytes (its "
                          f"run lengths are 14-bit ULEB128), this host's are {page_size}")
