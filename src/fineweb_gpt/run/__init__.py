"""A run's lifecycle: reading checkpoints (checkpoint_files)."""
