"""The Flower runtime: the same round loop as the simulation, over a SuperLink and its SuperNodes.

`wire` turns plans and updates into Flower records and back; `strategy` is the round loop as a Flower
strategy; `server_app` and `client_app` are the apps that `flwr run` starts (the app definition is
`flower-app/pyproject.toml`).
"""
