"""The dataset contract (schema.py) and everything that writes, reads, checks and summarises it."""
