"""The typed values where components meet keep the plain shapes they replaced: an `Outcome`
is its old string (in JSON, metric labels and comparisons), and a report read from JSON
writes back the same JSON."""

import json

from nodes.phase import ENDED, Outcome, PausedEnd


def test_outcome_values_are_the_strings_they_replaced():
    assert {o.name: o.value for o in Outcome} == {
        "COMPLETED": "completed", "FAILED": "failed", "CANCELLED": "cancelled",
        "PAUSED": "postcopy-paused", "UNKNOWN": "unknown", "WAITING": "waiting",
        "RECEIVING": "receiving", "READY": "ready"}
    assert {p.value for p in PausedEnd} == {"completed", "resume", "lost"}
    assert ENDED == ("completed", "failed", "cancelled")


def test_an_outcome_is_its_string_in_json_comparisons_and_text():
    assert Outcome.COMPLETED == "completed" and "failed" == Outcome.FAILED
    assert json.dumps({"status": Outcome.PAUSED}) == '{"status": "postcopy-paused"}'
    assert f"{Outcome.CANCELLED}" == "cancelled" and str(Outcome.READY) == "ready"
    assert {"completed": 1}[Outcome.COMPLETED] == 1     # a dict keyed by the old strings
    assert Outcome("unknown") is Outcome.UNKNOWN
