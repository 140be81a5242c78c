"""The round loop (server logic) and the runtimes that carry its messages."""
