"""The cluster side of migbed: launching hosts, driving migrations, reports, the CLI."""
