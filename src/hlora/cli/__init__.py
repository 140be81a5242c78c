"""The `hlora` command line."""
