"""Sub-commands of `testbed`. Each module has ``register(subparsers)`` that adds its parser
and sets ``func`` to a callable taking the parsed namespace and returning an exit status."""
