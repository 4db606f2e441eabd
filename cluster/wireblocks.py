"""The report's account of what crossed the wire: the multifd block, built from both sides,
and the lines of the human table about zero pages, XBZRLE and the channels."""

from typing import TYPE_CHECKING, Protocol

from cluster.reportparts import MultifdBlock, XbzrleBlock
from nodes.units import format_bytes

if TYPE_CHECKING:
    from nodes.migration.results import DestinationResult, SourceResult


class WireReport(Protocol):
    """What the wire's lines read of a report (a `cluster.report.MigrationReport`, which
    draws them: a Protocol so that this module needs not import the report back)."""

    normal_pages: int
    zero_pages: int
    xbzrle: XbzrleBlock | None
    multifd: MultifdBlock | None


def multifd_block(source: "SourceResult",
                  dest: "DestinationResult | None") -> MultifdBlock | None:
    """{channels, bytes_per_channel, compression, compression_level, compression_ratio
    (page bytes before / after), cpu_seconds {source, destination} of the channels'
    threads, syncs}; None without channels."""
    stats = source.wire.get("multifd")
    if stats is None:
        return None
    block = {k: v for k, v in stats.items() if k != "cpu_seconds_source"}
    block["cpu_seconds"] = {"source": stats["cpu_seconds_source"],
                            "destination": dest.multifd_cpu_seconds if dest else None}
    return MultifdBlock.from_dict(block)


def wire_lines(r: WireReport) -> list[str]:
    lines = [f"  pages: {r.normal_pages} normal, {r.zero_pages} zero"]
    x = r.xbzrle
    if x is not None:
        lines.append(
            f"  xbzrle: cache {format_bytes(x.cache_size)}, {x.pages} pages encoded "
            f"({format_bytes(x.bytes)}), {x.cache_miss} misses (rate "
            f"{x.cache_miss_rate:.2f}), encoding rate {x.encoding_rate:.1f}, "
            f"{x.overflow} overflows")
    m = r.multifd
    if m is not None:
        ratio = m.compression_ratio
        cpu = m.cpu_seconds
        lines.append(
            f"  multifd: {m.channels} channels ("
            + ", ".join(format_bytes(b) for b in m.bytes_per_channel)
            + f"), compression {m.compression}"
            + (f" level {m.compression_level}, ratio {ratio:.2f}" if ratio else "")
            + f"; channel CPU source {cpu['source'] or 0:.3f} s, destination "
              f"{cpu['destination'] or 0:.3f} s")
    return lines
