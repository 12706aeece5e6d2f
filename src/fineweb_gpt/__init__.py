"""Train GPT-2-style language models from scratch on FineWeb parquet shards."""

__version__ = "0.1.0"
