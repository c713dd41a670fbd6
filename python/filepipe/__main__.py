"""`python -m filepipe` and the `filepipe` command."""

import sys


def main() -> None:
    """Runs the command line. `consume` makes SIGTERM and SIGINT stop requests before
    anything else is imported, so a signal at any moment of its start is a clean stop."""
    if sys.argv[1:2] == ["consume"]:
        from filepipe import shutdown

        shutdown.install()
    from filepipe.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
