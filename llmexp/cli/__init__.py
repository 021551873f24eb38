"""The ``llmexp`` command and its subcommands: each module is one subcommand, ``main`` dispatches them."""
