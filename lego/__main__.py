"""`python -m lego ...`: the `lego` command without its installed script (containers, CI)."""

from lego.cli import main

main()
