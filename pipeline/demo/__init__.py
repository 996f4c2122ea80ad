"""Procedurally generated demo task and the tiny teacher trained on it."""
