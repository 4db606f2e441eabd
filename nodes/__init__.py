"""One emulated host: the Xen model (`nodes.xen`), the migration engine (`nodes.migration`),
the faults a user injects (`nodes.faults`) and the host runtime (`nodes.host`, whose `actor`
is the only Ray module here). ARCHITECTURE.md says what each may import."""
