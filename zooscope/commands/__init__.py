"""One module per ``zooscope`` subcommand, each with ``register(subparsers)`` and ``run(args) -> int``."""
