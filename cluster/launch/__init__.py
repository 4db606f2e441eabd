"""Launching clusters: the hosts of a local or existing Ray cluster (`launcher`), where each
goes (`placement`), the persistent cluster of `migbed up` (`persistent`) and the reaper of a
start-up's processes (`reaper`)."""
