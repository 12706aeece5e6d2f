"""The report: the run's facts, then its problems, then the notes; as markdown (REPORT.md, and
the doctor's output into a file or a pipe) or as plain text (the doctor's output in a terminal).

Everything quoted from a run folder or log (names, paths, devices) goes through
run_folder.quoted, so a crafted value cannot add lines, headings or links to the report.
"""

from urllib.parse import quote

from fineweb_gpt.doctor.record import SOURCE_NAMES, Finding, RunRecord
from fineweb_gpt.flops import human_count
from fineweb_gpt.run.run_files import quoted


def describe_run(run: RunRecord) -> list[tuple[str, str]]:
    """The facts a report starts with: (what, the fact)."""
    lines = [("source", SOURCE_NAMES.get(run.source, run.source))]
    if run.num_params:
        shape = ", ".join(f"{k}={run.get(k)}" for k in ("n_layer", "n_head", "n_embd", "block_size") if run.get(k))
        name = quoted(run.get("model_name", "?"))
        lines.append(("model", f"{name}: {human_count(run.num_params)} parameters{f' ({shape})' if shape else ''}"))
    trained = f"{run.last_step:,} steps"
    if run.knows_tokens:
        trained += f", {human_count(run.tokens_seen)} tokens"
    if run.get("tokens_per_step"):
        trained += f" ({run.summary['tokens_per_step']:,} per step)"
    lines.append(("trained", trained))
    if run.get("max_steps"):
        lines.append(("plan", f"{run.summary['max_steps']:,} steps{run.plan_note()}"))
    val = run.points("val/loss")
    if val:
        last, best = val[-1], min(val, key=lambda p: p.value)
        lowest = f"lowest {best.value:.4f} at step {best.step:,}"
        lines.append(("val loss", f"{last.value:.4f} at step {last.step:,} ({lowest})"))
    hellaswag = run.points("eval/hellaswag_acc_norm")
    if hellaswag:
        lines.append(("HellaSwag", f"acc_norm {hellaswag[-1].value:.4f} at step {hellaswag[-1].step:,}"))
    names = dict.fromkeys(str(run.get(key)) for key in ("hw_name", "device_name") if run.get(key))
    hardware = " ".join(quoted(name, 80) for name in names)
    if run.get("compile") is not None:
        hardware += f"{', ' if hardware else ''}{'compiled' if run.get('compile') else 'not compiled'}"
    if hardware:
        lines.append(("hardware", hardware))
    return lines


def render_finding(finding: Finding) -> list[str]:
    lines = [f"### {finding.title}", "", finding.evidence + "."]
    if finding.fix:
        lines += ["", f"**{'Fix' if finding.problem else 'Next'}:** {finding.fix}."]
    return lines + [""]


def render_markdown(source: str, run: RunRecord, findings: list[Finding], plot_name: str) -> str:
    problems = [f for f in findings if f.problem]
    notes = [f for f in findings if not f.problem]
    facts = [f"| {what} | {fact} |" for what, fact in describe_run(run)]
    out = [f"# Run doctor: {quoted(source, 200)}", "", "| | |", "|---|---|", *facts, ""]
    caption = f"train and val loss against {run.progress_unit}, learning rate on the right axis"
    out += [f"![{caption}]({quote(plot_name)})", ""]
    out += [f"## Problems ({len(problems)})" if problems else "## No problems found", ""]
    out += [line for finding in problems for line in render_finding(finding)]
    if notes:
        out += ["## Notes", ""] + [line for finding in notes for line in render_finding(finding)]
    return "\n".join(out)


def render_text(source: str, run: RunRecord, findings: list[Finding]) -> str:
    """The same report for a terminal: no markdown marks, the facts aligned, each finding's text
    indented under its title (the plot's path is printed after it)."""
    problems = [f for f in findings if f.problem]
    notes = [f for f in findings if not f.problem]
    out = [f"Run doctor: {quoted(source, 200)}", ""]
    out += [f"  {what:10s} {fact}" for what, fact in describe_run(run)]
    out += ["", f"Problems ({len(problems)})" if problems else "No problems found"]
    for heading, group in (("", problems), ("Notes", notes if notes else [])):
        if heading and group:
            out += ["", heading]
        for finding in group:
            out += ["", f"  {finding.title}", f"    {finding.evidence}."]
            if finding.fix:
                out.append(f"    {'Fix' if finding.problem else 'Next'}: {finding.fix}.")
    return "\n".join(out) + "\n"
