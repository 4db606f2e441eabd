"""Sending: the source's phases (`sender`), its setup (`opening`), its live rounds
(`liverounds`), its context split by owner (`source_context`), the page `pipeline` where
pages leave, the paced `link`, the bitmap syncs (`dirtysync`) and multifd's channels
(`multifd`)."""
