"""The field table is the one place a setting is named: every row reads its own default, no
two rows share a flag or a scenario key, and what is generated from it (the sections of
`MigrationSettings`, the CLI's options, the sweep's knobs, the README's table) agrees with it.
"""

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.cli.options import dest_of, field_values, settings_from, workload_from
from cluster.fieldtable import (
    CLI_FIELDS,
    FIELDS,
    GUEST_FIELDS,
    README,
    WORKLOAD_FIELDS,
    field_named,
    readme_block,
    readme_table,
)
from cluster.sweep.knobs import FIXED_ONLY, KNOBS, SECTION_KEYS, TABLES
from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec
from nodes.migration.fields import MIGRATION_FIELDS, rows_of
from nodes.migration.settings import FLAT_NAMES, SECTIONS, MigrationSettings
from workloads.spec import WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("row", FIELDS, ids=lambda f: f"{f.section}.{f.name}")
def test_every_row_reads_its_own_default(row):
    value = row.value                      # the default, as a user writes it, read
    if row.default is not None and not row.is_switch and row.default != ():
        assert value == row.read(row.default, "default")
    assert row.help and "{" not in row.help_text()


def test_flags_are_unique():
    flags = [f for row in FIELDS for f in (row.flag, *row.aliases) if f]
    assert len(flags) == len(set(flags)), sorted(f for f in flags if flags.count(f) > 1)
    assert all(f.startswith("--") for f in flags)


def test_scenario_keys_and_knobs_are_unique_in_their_table():
    for table, rows in TABLES.items():
        keys = [r.toml for r in rows if r.toml]
        assert len(keys) == len(set(keys)), table
    knobs = [r.knob for r in FIELDS if r.knob]
    assert len(knobs) == len(set(knobs))


def test_names_are_unique_in_their_section_and_say_whose_they_are():
    for rows in (MIGRATION_FIELDS, GUEST_FIELDS, WORKLOAD_FIELDS, CLI_FIELDS):
        names = [r.name for r in rows]
        assert len(names) == len(set(names))
    assert set(FLAT_NAMES) == {r.name for r in MIGRATION_FIELDS if r.is_field}
    assert {r.name for r in WORKLOAD_FIELDS} == {f.name for f in dataclasses.fields(WorkloadSpec)}


def test_the_sections_hold_exactly_their_rows_with_their_defaults():
    for name, cls in SECTIONS.items():
        rows = rows_of(name)
        assert [f.name for f in dataclasses.fields(cls)] == [r.name for r in rows]
        made = cls()
        for r in rows:
            assert getattr(made, r.name) == r.value, r.name
    assert {r.section for r in MIGRATION_FIELDS} == set(SECTIONS)


def test_the_specs_defaults_are_the_rows_defaults():
    wl = WorkloadSpec()
    for r in WORKLOAD_FIELDS:
        assert getattr(wl, r.name) == r.value, r.name
    guest = GuestSpec("g", 4096)
    assert (guest.mode, guest.dma) == (field_named("mode").value, field_named("dma").value)


def test_flat_keywords_make_the_sections_behind_them():
    s = MigrationSettings(policy="qemu", multifd_channels=2, auto_converge=True,
                          timeout_seconds=5.0)
    assert s.switchover.policy == s.policy == "qemu"
    assert s.wire.multifd_channels == 2 and s.convergence.auto_converge
    assert s.link.timeout_seconds == 5.0
    assert dataclasses.replace(s, link_shared=True).link.link_shared
    assert dataclasses.replace(s, link_shared=True).policy == "qemu"
    assert MigrationSettings(link=s.link, latency_seconds=0.5).link.timeout_seconds == 5.0
    assert set(s.to_dict()) == set(FLAT_NAMES)
    with pytest.raises(TypeError, match="speed"):
        MigrationSettings(speed=1)
    with pytest.raises(ConfigError, match="unknown MigrationSettings settings: speed"):
        MigrationSettings.from_dict({"speed": 1})


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings}


def _command(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["migrate", "model", "evacuate", "soak"])
def test_every_command_taking_migration_settings_has_every_row_as_the_table_says(command):
    options = _options(_command(command))
    for r in MIGRATION_FIELDS:
        if not r.flag or r.name == "faults":
            continue
        action = options[r.flag]
        assert action.dest == dest_of(r) and action.help == r.help_text(), r.flag
        if not r.is_switch:
            assert action.default == r.value and action.metavar == r.metavar, r.flag
            assert (action.choices or ()) == (r.choices or ()), r.flag


@pytest.mark.parametrize("command", ["migrate", "create"])
def test_the_workload_options_are_the_tables(command):
    options = _options(_command(command))
    for r in WORKLOAD_FIELDS:
        if r.flag:
            assert all(options[f].dest == dest_of(r) for f in (r.flag, *r.aliases))


def test_options_not_given_build_the_defaults():
    args = build_parser().parse_args(["migrate"])
    assert settings_from(args) == MigrationSettings()
    assert workload_from(args) == WorkloadSpec()
    args = build_parser().parse_args(["migrate", "--no-verify", "--pattern", "hotset",
                                      "--completion-timeout", "10s/GiB"])
    s, wl = settings_from(args), workload_from(args)
    assert not s.verify and s.completion_timeout_per_gib_seconds == 10.0
    assert wl.pattern == "hotset"
    assert field_values(args, GUEST_FIELDS)["guest_memory_bytes"] == 64 * 1024 * 1024


def test_the_knobs_are_the_tables_rows():
    for table, rows in TABLES.items():
        for r in rows:
            if r.knob:
                knob = KNOBS[r.knob]
                assert (knob.section, knob.field, knob.parse, knob.label, knob.scale) == \
                    (table, r.name, r.read, r.label, r.scale)
                assert SECTION_KEYS[table][r.toml] == r.knob
            elif r.toml:
                assert FIXED_ONLY[table][r.toml] == (r.name, r.read)
    assert set(KNOBS) - {r.knob for r in FIELDS} == {"aid"}


def test_a_value_reads_the_same_on_the_command_line_and_in_a_scenario():
    from cluster.sweep import Scenario
    sc = Scenario.from_toml('name = "x"\n[migration]\nbandwidth = "64MiB"\n'
                           'postcopy_after = "500ms"\nadaptive_rate = true\n'
                           'policy = "xen-legacy"\nmultifd_zlib_level = 3\n')
    args = build_parser().parse_args(["migrate", "--bandwidth", "64MiB", "--postcopy-after",
                                      "500ms", "--adaptive-rate", "--policy", "xen-legacy",
                                      "--multifd-zlib-level", "3"])
    assert sc.migration == settings_from(args)
    assert Scenario.from_toml(sc.to_toml()) == sc


def test_the_readme_table_is_the_generated_one():
    block = readme_block(README.read_text())
    assert block is not None, "README.md lost the markers of its option table"
    assert block == readme_table(), ("README.md's option table differs from the field "
                                     "table: run `python -m cluster.fieldtable`")
    for r in CLI_FIELDS[:2]:
        assert f"`{r.flag} {r.metavar}`" in block


def _imports(module: str) -> set[str]:
    """Every migbed module `module` imports, in a function or under TYPE_CHECKING too."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_no_cycle_between_the_settings_and_their_sections_nor_the_cli_options():
    for module in ("nodes.migration.decide.convergence", "nodes.migration.wire.capabilities",
                   "nodes.migration.fields"):
        assert "nodes.migration.settings" not in _imports(module), module
    assert "nodes.migration.decide.convergence" not in _imports("nodes.migration.wire.capabilities")
    assert "nodes.migration.wire.capabilities" not in _imports("nodes.migration.decide.convergence")
    assert not {"cluster.cli.postcopy_commands", "cluster.cli"} & _imports("cluster.cli.options")
