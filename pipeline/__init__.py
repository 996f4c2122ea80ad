"""distill: offline synthetic-data knowledge distillation (teacher top-k logprobs -> Parquet -> student)."""

__version__ = "0.1.0"
