"""``python -m ocicas``: the ``ocicas`` command."""

from ocicas.cli import main

main()
