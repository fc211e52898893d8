"""One module per ``flashffn`` subcommand: ``add_arguments(parser)`` and ``run(args)``."""
