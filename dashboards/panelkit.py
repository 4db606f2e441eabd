"""The building blocks of migbed's dashboard (`build.py` and its rows): the Prometheus
datasource, the label selectors with the dashboard's variables, panel ids handed out in
order, and the panel shapes every row uses, so that a row can live in a module of its own.
"""

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.dashboard import Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

PROMETHEUS = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label selectors with the dashboard's variables.
H = 'host=~"$host"'
HG = 'host=~"$host", guest=~"$guest"'
# A panel with a line per host or per guest draws the TOP_K largest at each instant: a rack
# of 32 hosts and 128 guests would be a wall of colour, and a legend taller than the panel.
TOP_K = 8


def top(expr: str) -> str:
    """The TOP_K largest series of `expr` at each instant."""
    return f"topk({TOP_K}, {expr})"


class Panels:
    """Hands out panel ids in order, so the JSON is stable from one build to the next."""

    def __init__(self) -> None:
        self.next_id = 1

    def take(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> Row:
        return Row(title).id(self.take())

    def _common(self, panel, title: str, description: str, width: int, height: int):
        return (panel.id(self.take()).title(title).description(description).datasource(PROMETHEUS)
                .span(width).height(height))


    def ts(self, title, description, unit, queries, width=12, height=8, stacked=False, bars=False):
        panel = self._common(timeseries.Panel(), title, description, width, height).unit(unit)
        panel = panel.legend(legend_bottom())
        if stacked:
            panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(30)
        if bars:
            panel = panel.draw_style(GraphDrawStyle.BARS).fill_opacity(60)
        return with_queries(panel, queries)

    def single(self, title, description, expr, unit="short", width=4):
        panel = (self._common(stat.Panel(), title, description, width, 4).unit(unit)
                 .reduce_options(ReduceDataOptions().calcs(["lastNotNull"])))
        return panel.with_target(query(expr, instant=True))

    def distribution(self, title, description, metric):
        panel = (self._common(bargauge.Panel(), title, description, 12, 8).unit("short")
                 .display_mode(BarGaugeDisplayMode.GRADIENT)
                 .orientation(VizOrientation.VERTICAL)
                 .reduce_options(ReduceDataOptions().calcs(["lastNotNull"])))
        return panel.with_target(query(
            f"sum by (le) (increase({metric}_bucket{{{HG}}}[$__range]))", "{{le}}",
            instant=True, fmt=PromQueryFormat.HEATMAP))

    def quantiles(self, title, description, metric, selector=HG):
        qs = [query(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}"
                    "[5m])))",
                    f"p{round(q * 100)}", ref) for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))]
        return self.ts(title, description, "s", qs)


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False,
          fmt: PromQueryFormat | None = None) -> Dataquery:
    q = Dataquery().expr(expr).ref_id(ref).datasource(PROMETHEUS)
    if legend:
        q = q.legend_format(legend)
    q = q.instant() if instant else q.range()
    if fmt is not None:
        q = q.format(fmt)
    return q


def with_queries(panel, queries: list[Dataquery]):
    for q in queries:
        panel = panel.with_target(q)
    return panel


def legend_bottom() -> VizLegendOptions:
    return (VizLegendOptions().display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM).show_legend(True))


