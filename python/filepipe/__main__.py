"""`python -m filepipe` and the `filepipe` command."""

import sys


def main() -> None:
    """Runs the command line. `consume` makes SIGTERM and SIGINT stop requests before
    anything else is imported, so a signal at any moment of its start is a clean stop,
    and starts with the cyclic garbage collector off: what its start-up makes (modules,
    classes, the command line, the connections) is kept for good, and collecting while
    it was made walked it again and again, a tenth of the start-up's CPU. The command
    turns the collector on when it starts consuming (`filepipe.cli.consume`).

    Whatever the command, the process's last act is to set the collector aside: the
    collections the interpreter runs as it exits would walk every object left (modules,
    classes, the consumer's buffers) only for the memory to go back to the system
    anyway; they took about a quarter of an empty drain's CPU."""
    import gc

    if sys.argv[1:2] == ["consume"]:
        from filepipe import shutdown

        gc.disable()
        shutdown.install()
    from filepipe.cli import main as cli_main

    try:
        cli_main()
    finally:
        gc.disable()
        gc.freeze()


if __name__ == "__main__":
    main()
