"""`python -m cluster.bench SECTION JSON`: a bench section's child process (`startup`: one
cluster started, measured, stopped; `scale`: the evacuations on a cluster of their own),
which prints one JSON line."""

import json
import sys

from cluster.bench.bench_options import BenchOptions
from cluster.bench.scale import scale_child
from cluster.bench.startup import startup_child

if len(sys.argv) == 3 and sys.argv[1] == "startup":
    print(json.dumps(startup_child(**json.loads(sys.argv[2]))))
elif len(sys.argv) == 3 and sys.argv[1] == "scale":
    opts = BenchOptions.from_dict(json.loads(sys.argv[2]))
    print(json.dumps({"samples": scale_child(opts, lambda t: print(t, file=sys.stderr))}))
else:
    sys.exit("usage: python -m cluster.bench startup|scale JSON (internal; use `migbed bench`)")
