"""The budgets every Triton kernel configuration is held to (docs/design.md section 3) and the
table of docs/kernel-resources.md that records what the compiler made of each: tools/triton_check.py
judges each compile with `verdict`, writes the table with `table` / `write_doc` / `merge_doc`, and
compares with it through `parse_doc_table`."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kernel-resources.md"
BEGIN, END = "<!-- triton:begin -->", "<!-- triton:end -->"
BUDGET_S = 30.0
MAX_REGS_8_WARPS = 128
# (kernel, dtype) -> why an 8-warp program of it may use more than MAX_REGS_8_WARPS registers
REGISTER_EXCEPTIONS: dict = {}


def verdict(job, res) -> str:
    """'' when within the budgets, else what is wrong."""
    if not res.get("ok"):
        return "FAILED: " + res.get("error", "?").splitlines()[0][:300]
    bad = []
    if res["spill_st"] and job["dtype"] != "fp64":
        bad.append(f"spills {res['spill_st']} B")
    if job["warps"] == 8 and res["regs"] > MAX_REGS_8_WARPS and (job["kernel"],
                                                                 job["dtype"]) not in REGISTER_EXCEPTIONS:
        bad.append(f"{res['regs']} registers at 8 warps (> {MAX_REGS_8_WARPS})")
    if res["seconds"] > BUDGET_S:
        bad.append(f"compiled in {res['seconds']} s (> {BUDGET_S:.0f})")
    return "; ".join(bad)


def cell(res) -> str:
    if res is None:
        return ""
    if not res.get("ok"):
        return "fails"
    return f"{res['regs']}" + (f" / {res['spill_st']} B" if res["spill_st"] else "")


def row_key(job) -> tuple:
    return (job["kernel"], job["options"], job["dtype"],
            f"{job['block']}x{job['warps']}" + (" (autotune)" if job["autotune"] else ""))


def table(jobs, results, versions, archs) -> str:
    cols = [(a, v) for a in archs for v in versions]
    head = ["kernel", "options", "dtype", "BLOCK x warps"] + [f"sm_{a} {v}" for a, v in cols] + ["smem (B)", "max s",
                                                                                                 "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in jobs:
        rs = [results.get((job["id"], a, v)) for a, v in cols]
        got = [r for r in rs if r and r.get("ok")]
        notes = sorted({verdict(job, r) for r in rs if r is not None} - {""})
        if job["dtype"] == "fp64" and any(r["spill_st"] for r in got):
            notes.append("fp64 spills (allowed)")
        why = REGISTER_EXCEPTIONS.get((job["kernel"], job["dtype"]))
        if why and job["warps"] == 8 and any(r["regs"] > MAX_REGS_8_WARPS for r in got):
            notes.append(why)
        smem = max((r["smem"] for r in got), default="")
        secs = max((r["seconds"] for r in got), default="")
        lines.append("| " + " | ".join(list(row_key(job)) + [cell(r) for r in rs] + [str(smem), str(secs),
                                                                                     "; ".join(notes)]) + " |")
    return "\n".join(lines) + "\n"


def parse_doc_table():
    """{(row key..., column): cell} of docs/kernel-resources.md's table."""
    doc = DOC.read_text() if DOC.is_file() else ""
    section = doc.split(BEGIN)[1].split(END)[0] if BEGIN in doc else ""
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    if not lines:
        return {}
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name, value in zip(head[4:], cells[4:]):
            out[tuple(cells[:4]) + (name,)] = value
    return out


def merge_doc(tab):
    """Put the rows of `tab` into the table of DOC: a row with the same kernel, options, dtype and
    shape is replaced, a new one appended; the columns must be the table's."""
    section = DOC.read_text().split(BEGIN)[1].split(END)[0]
    old = [line for line in section.splitlines() if line.startswith("|")]
    new = tab.splitlines()
    if old and old[0] != new[0]:
        raise SystemExit(f"--merge-docs: the columns differ from {DOC.relative_to(ROOT)}'s ({old[0]}); "
                         "compile for the same archs and Triton versions")

    def key(line):
        return tuple(c.strip() for c in line.strip().strip("|").split("|"))[:4]

    fresh = {key(line) for line in new[2:]}
    write_doc("\n".join(new[:2] + [line for line in old[2:] if key(line) not in fresh] + new[2:]) + "\n")


def write_doc(tab):
    doc = DOC.read_text()
    DOC.write_text(doc.split(BEGIN)[0] + BEGIN + "\n" + tab + END + doc.split(END, 1)[1])
