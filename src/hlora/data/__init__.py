"""GLUE data: task specs, loaders (local TSV or the hub), tokenisation and client partitions."""
