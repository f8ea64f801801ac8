"""`python -m mlbus` is the `mlbus` command."""

from mlbus.cli import main

main()
