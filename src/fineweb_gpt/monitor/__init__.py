"""What a run tells while it trains, one callback a job:

run_summary.py   RunSummary: the plan and the data, printed, saved and logged at start; the last word
step_metrics.py  StepMetrics: per-step metrics and each evaluation's, the progress bar's values
health.py        HealthMonitor: the doctor's checks during training, each problem warned about once
"""
