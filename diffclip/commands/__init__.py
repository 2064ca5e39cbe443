"""One module per `diffclip` subcommand. Each has `add_parser(subparsers)` (which sets `run` as the handler) and
`run(args) -> int`; `diffclip/cli.py` lists the modules and turns user errors into one line and exit status 2."""
