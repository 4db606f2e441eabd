"""A workload's state as plain values: what travels in a migration record.

A workload resumes on its destination exactly where it stopped, so its generators travel
too. PCG64's state and increment are 128-bit integers, wider than msgpack's: they cross as
JSON text, which keeps them exact. Every other value must be plain msgpack data that the
stream decoder accepts (`check_state_values`), never a numpy scalar or a Python object.
"""

import json

import numpy as np

from nodes.errors import ConfigError

STATE_FORMAT = 1
# A workload's generators: page choice is the seed's own stream; these are the others.
CONTENT_STREAM = 1      # what a write puts in a page beside its counter
FILL_STREAM = 2         # the memory a guest starts with
_INT64_MAX = 2**63 - 1


def generator(seed: int, stream: int) -> np.random.Generator:
    """The generator of `stream` under `seed`: independent of the seed's other streams."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))


def generator_text(rng: np.random.Generator) -> str:
    """`rng`'s whole state as text (exact: JSON keeps the 128-bit integers)."""
    return json.dumps(rng.bit_generator.state, sort_keys=True)


def generator_from_text(text: str, what: str) -> np.random.Generator:
    """The generator `generator_text` wrote; ConfigError names `what` if it cannot be read."""
    try:
        bitgen = np.random.PCG64()
        bitgen.state = json.loads(text)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"workload state has an unreadable {what} state: {exc}") from None
    return np.random.Generator(bitgen)


def check_state_values(value: object, path: str = "state") -> None:
    """Raise ConfigError unless `value` is plain msgpack data with ints in signed 64 bits."""
    if value is None or isinstance(value, bool | float | str):
        return
    if isinstance(value, int):
        if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise ConfigError(f"{path} = {value} does not fit in a signed 64-bit integer")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_state_values(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{path} has a non-string key {key!r}")
            check_state_values(item, f"{path}.{key}")
        return
    raise ConfigError(f"{path} holds a {type(value).__name__}, not plain msgpack data")
