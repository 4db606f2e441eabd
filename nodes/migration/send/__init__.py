"""Sending: the source's phases (`sender`), its live rounds (`liverounds`), its context
(`source_context`), the page `pipeline` where pages leave, the paced `link`, the bitmap syncs
(`dirtysync`) and multifd's channels (`multifd`)."""
