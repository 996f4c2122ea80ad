"""Prefect flows wiring the `pipeline` stages; nothing in `pipeline/` imports Prefect."""
