"""``python -m runtime.serve`` = ``casam-serve`` (what tests and benchmarks start)."""

from runtime.serve.cli import main

main(prog_name="casam-serve")
