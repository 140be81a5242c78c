"""The client's side: local training of an adapter on the client's own data."""
