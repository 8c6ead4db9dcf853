"""``python -m ocicas``: the ``ocicas`` command."""

from ocicas._cli_entry import main

main()
