"""``python -m casam_serve`` = ``casam-serve`` (what tests and benchmarks start)."""

from casam_serve.cli import main

main(prog_name="casam-serve")
