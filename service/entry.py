"""The `clipprune` console script: how the process runs is settled (workers/hugepages.py)
before the command line and its libraries are imported, so that starting again costs no import
twice; then service/cli.py runs the command."""

import sys

from workers.hugepages import with_huge_pages


def main() -> int:
    with_huge_pages()
    from service.cli import main as run_command

    return run_command()


if __name__ == "__main__":
    sys.exit(main())
