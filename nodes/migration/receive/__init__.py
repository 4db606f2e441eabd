"""Receiving: the destination's steps (`receiver`), the bounded record `reader`, and the
`landing`, where pages land."""
