"""A host's side of the central rate allocator: the cluster's scheduler tells a source the
rate each of its outgoing migrations may send at (its max-min fair share of the links it
crosses, `cluster.fairshare`), and the sender paces itself at it from then on.

The rate may arrive before the sender's link is up (the scheduler sets it the moment the
migration starts), or while it runs; either way it is kept and applied to the link as soon
as there is one (`SourceFaults.on_attach`). Each sender paces on its own, so this holds
between processes and machines, where one shared pacer could not.
"""

import collections
import threading

KEEP_RATES = 256          # rates kept for migrations that have not started (or never will)


class PacedRates:
    """Mixed into the host service: `set_migration_rate`, and the hook its senders take."""

    lock: threading.RLock
    _faults: dict

    def _paced(self) -> collections.OrderedDict:
        rates = self.__dict__.get("_paced_rates")
        if rates is None:
            rates = self.__dict__["_paced_rates"] = collections.OrderedDict()
        return rates

    def set_migration_rate(self, migration_id: str, bytes_per_second: float | None) -> bool:
        """The outgoing migration's wire speed from now on (None: unlimited). Returns
        whether its link was up to take it at once (else it takes it when it comes up)."""
        with self.lock:
            rates = self._paced()
            rates[migration_id] = bytes_per_second
            rates.move_to_end(migration_id)
            while len(rates) > KEEP_RATES:
                rates.popitem(last=False)
            faults = self._faults.get(migration_id)
            if faults is not None and faults.link is not None:
                faults.link.set_link_rate(bytes_per_second)
                return True
            return False

    def pace_sender(self, migration_id: str, faults) -> None:
        """A sender is made: its link takes the rate set for it, now or once it is up."""
        def attached(link) -> None:
            with self.lock:
                rates = self._paced()
                if migration_id in rates:
                    link.set_link_rate(rates[migration_id])
        faults.on_attach = attached
