"""``python -m hpcserve`` is the ``hpcserve`` command."""

from hpcserve.cli import main

main()
