"""Deciding: the one switch-over arbiter (`switchover`) and its inputs: the pre-copy `policy`,
the convergence aids (`convergence`, `throttle`, `timeouts`, `adaptive`) and the fixed
downtime measured for a host pair (`fixeddowntime`)."""
