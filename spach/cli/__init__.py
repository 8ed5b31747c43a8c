"""The `spach` command line: `main` parses and dispatches, one thin module per sub-command (see `main.COMMANDS`)."""
