"""edgebundle: a deployment bundle for running a llama chat on fleets of edge devices.

The CLI (:mod:`edgebundle.cli`) is a thin layer over the core modules; everything a
command does is reachable without click.
"""

__version__ = "0.1.0"
