"""The `loratune` command line."""
