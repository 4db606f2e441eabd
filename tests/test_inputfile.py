"""A user's input file: bounded, parsed, every problem one ConfigError line naming it."""

import pytest

from cluster.inputfile import read_json, read_toml
from nodes.errors import ConfigError


def test_json_and_toml_are_read(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "a.toml").write_text("x = 1\n")
    assert read_json(tmp_path / "a.json", "a report") == {"x": 1}
    assert read_toml(tmp_path / "a.toml", "a guest file") == {"x": 1}


@pytest.mark.parametrize("content,reader,want", [
    (b"{", read_json, "is not JSON"),
    (b"x = = 1", read_toml, "is not TOML"),
    (b"\xff\xfe{}", read_json, "is not text"),
    (b"x" * 2048, read_json, "is over 1.0 KiB; is it a thing?"),
])
def test_a_bad_file_is_one_line_that_names_it(tmp_path, content, reader, want):
    path = tmp_path / "in"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        reader(path, "a thing", max_bytes=1024, label=f"--x {path}")
    assert want in str(exc.value) and f"--x {path}" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*missing.json"):
        read_json(tmp_path / "missing.json", "a report")
