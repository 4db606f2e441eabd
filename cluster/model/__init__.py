"""An analytic pre-copy model: predict a migbed migration (rounds, bytes, downtime) without
running it.

The model follows migbed's sender step by step, in expected values:

- The guest has `guest_pages = memory / page_size` pages; the top `ceil(guest_pages /
  (page_size / 8))` are page-table pages the workload never writes, the rest (`data_pages`)
  are what the workload dirties (`workload`: the distinct pages a pattern writes in a
  window, its hot set sized as the workload sizes it).
- Before every live round the sender builds `PrecopyStats` and asks the *real* policy object
  (`nodes.migration.decide.policy.policy_for`, as the sender builds it), so the stop rules are exactly
  migbed's. Before round 0 every guest page is dirty (`iterative`).
- CONTINUE: the dirty pages go at the effective rate `min(link, rate limit)`; the round lasts
  `wire bytes / rate + latency`; the pages the workload dirties meanwhile
  (`expected_distinct_pages`) are the next round's dirty count.
- Policies with `skip_redirtied` (xen-legacy) skip pages dirtied again before the sender
  reaches them: the skipped count is the expected overlap of the round's to-send set with the
  pages written between the round's start and the moment the sender gets to each page. Skipped
  pages are not sent (they stay dirty for the next round), which shortens the round; the
  round length and the skipped count are solved together.
- STOP_AND_COPY: the guest pauses and the remaining dirty pages go at the *link* speed (the
  rate limit is lifted for stop-and-copy, as QEMU does), plus `latency` and a fixed
  `resume_seconds` (T_resume): that is the downtime.
- A page on the wire costs `page_size + bytes_per_page_overhead` (the pfn word) plus a record
  header of `record_overhead_bytes` per 1024 pages.

`closed_form` gives Liu et al.'s (HPDC 2011) closed form for reference, and `compare` sets a
measured migbed report against a prediction (`reference`); `block` puts the prediction beside
every measured migration.
"""

from cluster.model.iterative import predict
from cluster.model.reference import closed_form, compare
from cluster.model.rounds import ModelPrediction, ModelRound
from cluster.model.workload import expected_distinct_pages

__all__ = ["ModelPrediction", "ModelRound", "closed_form", "compare",
           "expected_distinct_pages", "predict"]
