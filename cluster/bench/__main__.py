"""`python -m cluster.bench startup HOSTS HOST_MEMORY_BYTES`: the start-up section's child
process, which starts a fresh cluster, measures it and prints one JSON line."""

import json
import sys

from cluster.bench.scale import startup_child

if len(sys.argv) == 4 and sys.argv[1] == "startup":
    print(json.dumps(startup_child(int(sys.argv[2]), int(sys.argv[3]))))
else:
    sys.exit("usage: python -m cluster.bench startup HOSTS HOST_MEMORY_BYTES "
             "(internal; use `migbed bench`)")
