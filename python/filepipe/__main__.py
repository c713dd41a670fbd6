"""`python -m filepipe` and the `filepipe` command."""

import sys


def main() -> None:
    """Runs the command line. `consume` makes SIGTERM and SIGINT stop requests before
    anything else is imported, so a signal at any moment of its start is a clean stop,
    and starts with the cyclic garbage collector off: what its start-up makes (modules,
    classes, the command line, the connections) is kept for good, and collecting while
    it was made walked it again and again, a tenth of the start-up's CPU. The command
    turns the collector on when it starts consuming (`filepipe.cli.consume`)."""
    if sys.argv[1:2] == ["consume"]:
        import gc

        from filepipe import shutdown

        gc.disable()
        shutdown.install()
    from filepipe.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
