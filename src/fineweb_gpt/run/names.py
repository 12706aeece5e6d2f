"""The names of what a run folder holds: every module that writes or reads one uses these."""

from pathlib import Path

CHECKPOINTS = "checkpoints"  # the folder of checkpoints
LAST = "last.ckpt"  # the link to the newest checkpoint, inside CHECKPOINTS
LAST_CHECKPOINT = Path(CHECKPOINTS) / LAST
SUMMARY_FILE = "run_summary.json"  # the plan printed at start
RESULT_FILE = "result.json"  # how the run ended
SAMPLES_FILE = "samples.jsonl"  # text from a fixed prompt at each HellaSwag evaluation (evals/in_training.py)
METRICS_FILE = Path("csv") / "metrics.csv"  # every metric at every optimizer step
HYDRA_DIR = ".hydra"  # Hydra's record of the run: config.yaml, hydra.yaml, overrides.yaml
HYDRA_CONFIG = Path(HYDRA_DIR) / "config.yaml"
HYDRA_SETTINGS = Path(HYDRA_DIR) / "hydra.yaml"
HYDRA_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"
LOCK_FILE = ".lock"  # one run at a time (folder_lock.py)
