"""Experiments: `compare.py` plans and runs every method and seed beside the references, `report.py` turns
the run directories into tables and charts."""
