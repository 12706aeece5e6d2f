"""A run's lifecycle, one module a concern:

    names.py              what a run folder holds, by name
    folder_lock.py        one run at a time in a folder, and who ever held it
    ownership.py          claiming the folder before writing; removing it after a refusal only if it is ours
    resume_policy.py      which checkpoint a run resumes from, whether this command may, and what it changes
    checkpoint_files.py   reading checkpoints (the one loader) and what a folder of them holds
    checkpoint_saving.py  saving between optimizer steps, whole files, the newest two, last.ckpt
    stop_signals.py       the signals that stop a run, saving first; SLURM's requeue
    evaluation_schedule.py  evaluating at step 0, every val_every_steps and at the last step
    latest_link.py        outputs/latest, the newest run that trained
    run_files.py          reading run folders (the doctor, the sweep table) and the run's own records

Every file is written through fineweb_gpt.safe_files.
"""
