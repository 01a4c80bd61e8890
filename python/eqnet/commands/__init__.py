"""Subcommands of the eqnet CLI (see eqnet.cli)."""
