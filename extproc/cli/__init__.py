"""The `extproc` command."""
