"""The Flower runtime: the same round loop as the simulation, over a SuperLink and its SuperNodes.

`wire` turns plans and updates into Flower records and back; `strategy` is the round loop as a Flower
strategy; `server_app` is the ServerApp that runs it; `client_app` is the ClientApp, which answers which
partition its node holds and hands train messages to `node`. The app definition that `flwr run`
submits is `flower-app/pyproject.toml`.
"""
