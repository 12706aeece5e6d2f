"""A SLURM of one node for tests: sbatch, srun, scontrol requeue and sacct, as far as submitit
(hydra/launcher=slurm) uses them. Run as `python fake_slurm.py <command> ARGS`; the tests put
wrappers named after the commands on PATH. FAKE_SLURM_DIR holds what it records.

sbatch starts the batch script at once, in the background, with the job's SLURM_* variables;
srun runs its command as the job step, in a process group of its own (a signal to the step reaches
its processes, not the batch shell); scontrol requeue records the call and, once the job's
processes are gone, starts the batch script again (SLURM_RESTART_COUNT counts the restarts);
sacct says the job is running (submitit then waits for its result file).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_SLURM_DIR"])
JOB_ID = "4242"  # one job (submitit submits a sweep of one run as a plain job, not an array)


def record(name: str, line: str) -> None:
    with open(STATE / name, "a") as file:
        file.write(line + "\n")


def start_batch(script: Path, restarts: int) -> None:
    if "#SBATCH --array" in script.read_text():
        raise NotImplementedError("fake_slurm runs single jobs, not job arrays")
    env = {
        **os.environ,
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_RESTART_COUNT": str(restarts),
    }
    log = open(STATE / f"batch{restarts}.log", "w")
    batch = subprocess.Popen(["bash", str(script)], env=env, stdout=log, stderr=log, start_new_session=True)
    (STATE / "batch.json").write_text(json.dumps({"pid": batch.pid, "restarts": restarts, "script": str(script)}))


def sbatch(script: str) -> None:
    record("sbatch_scripts", Path(script).read_text())
    start_batch(Path(script), restarts=0)
    print(f"Submitted batch job {JOB_ID}")


def srun(args: list[str]) -> None:
    names = {"%j": JOB_ID, "%t": "0"}
    outputs = {}
    while args[0].startswith("--"):
        option = args.pop(0)
        if option in ("--output", "--error"):
            outputs[option] = re.sub("%[jt]", lambda m: names[m.group()], args.pop(0))
    os.setsid()  # the job step: a process group of its own
    (STATE / "step.pid").write_text(str(os.getpid()))
    for option, descriptor in (("--output", 1), ("--error", 2)):
        if option in outputs:
            Path(outputs[option]).parent.mkdir(parents=True, exist_ok=True)
            os.dup2(os.open(outputs[option], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), descriptor)
    os.execvpe(args[0], args, {**os.environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def scontrol(args: list[str]) -> None:
    record("scontrol_calls", " ".join(args))
    if args[0] == "requeue":
        subprocess.Popen([sys.executable, __file__, "_restart"], start_new_session=True)


def restart_when_gone() -> None:
    if not (STATE / "batch.json").exists():  # no batch job of ours to restart
        return
    batch = json.loads((STATE / "batch.json").read_text())
    while alive(batch["pid"]) or alive(int((STATE / "step.pid").read_text())):
        time.sleep(0.2)
    start_batch(Path(batch["script"]), restarts=batch["restarts"] + 1)


def sacct() -> None:
    print("JobID|State|NodeList")
    print(f"{JOB_ID}|RUNNING|node1")


if __name__ == "__main__":
    command, arguments = sys.argv[1], sys.argv[2:]
    if command == "sbatch":
        sbatch(arguments[-1])
    elif command == "srun":
        srun(arguments)
    elif command == "scontrol":
        scontrol(arguments)
    elif command == "sacct":
        sacct()
    elif command == "_restart":
        restart_when_gone()
