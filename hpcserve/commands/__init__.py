"""CLI subcommands, one module each; registered by hpcserve.cli."""
