"""The run doctor: reads a run folder or a trainer's log and says, from its measurements, what
went right and wrong and what to change. Training runs the same checks (monitor.health), importing
checks.py and the modules it uses, never the report tool: sources, the log readers, report, plot, cli.

    record.py        the run record the checks read (summary + metric rows) and Finding
    sources.py       what a path holds: run folder, metrics CSV, or a log told from its content
    nanogpt_log.py   nanoGPT's console output (with a bounded, string-free config evaluator)
    llmc_log.py      llm.c's main.log and console output
    modded_log.py    modded-nanogpt's logs
    budget.py        model size against its name, tokens against Chinchilla, epochs
    curve.py         divergence, overfitting, plateaus (fitted), the learning rate on a plateau, dropout
    reference.py     published runs of the same size, to place the run beside
    speed.py         MFU against the real GPU, through flops.model_flops_utilization
    forecast.py      the power-law fit and what continuing buys
    memory.py        the memory model (measured and modelled, compiled and not) and batch planner
    checks.py        every check in report order, and diagnose()
    report.py        the markdown report
    plot.py          the loss plot, with the reference curve dashed
    cli.py           the command line (fineweb-gpt-doctor, python -m fineweb_gpt.doctor)

Nothing here reads a file at import time.
"""


def __getattr__(name: str):
    # Console scripts installed before the doctor became a package import fineweb_gpt.doctor:main.
    if name == "main":
        from fineweb_gpt.doctor.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
