"""Post-copy and hybrid migration, as QEMU's postcopy-ram does it: the guest moves to the
destination first and its pages follow, pushed in the background or fetched when it touches
them. A post-copy migration is a different list of phases (`source.POSTCOPY`) over the same
page pipeline and landing as pre-copy.

- `trigger`: when the live rounds give way to the switch (after N rounds, 0 for pure
  post-copy; after a time; when the operator asks; when a policy decides so).
- `source`: the source's switch and push; `state`, what they share and count.
- `returnpath`: the destination -> source records (page requests) and the thread that reads
  them on the source.
- `pagefault`: the destination's handler of its guest's accesses to missing pages.
- `destination`: the destination running the guest while its pages arrive.
- `recovery`: a broken link after the switch: postcopy-paused, reconnect, the received set.
"""
