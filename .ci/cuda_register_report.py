#!/usr/bin/env python3
"""Registers, spills and shared memory of every CUDA kernel, from `nvcc -Xptxas -v` logs, checked against the
budgets declared in csrc/cuda/register_budgets.txt. Fails (exit 1) on any spill, on a kernel over its budget,
or on a log without ptxas lines.

Usage: .ci/cuda_register_report.py BUDGETS LOG [LOG ...]   (each LOG: the stderr of one nvcc -Xptxas -v run)
"""

import fnmatch
import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(?P<symbol>[^']+)' for '(?P<arch>sm_\d+)'")
SPILLS = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
USAGE = re.compile(r"Used (?P<registers>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def demangle(symbols):
    result = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def short_name(demangled):
    """`void ns::(anonymous namespace)::kernel<float, int>(args)` -> `kernel<float, int>`."""
    head = demangled.replace("(anonymous namespace)::", "")
    depth, cut = 0, len(head)
    for i, ch in enumerate(head):  # cut at the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    name = head[:cut].removeprefix("void ").strip()
    name = re.sub(r"\b\w+::", "", name)  # drop namespaces, also inside template arguments
    return name


def read_budgets(path):
    budgets = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            pattern, registers = line.rsplit(None, 1)
            budgets.append((pattern.strip(), int(registers)))
    return budgets


def parse(log_path):
    kernels, current = [], None
    for line in open(log_path):
        if m := ENTRY.search(line):
            current = {"symbol": m["symbol"], "arch": m["arch"], "log": log_path}
            kernels.append(current)
        elif current is not None and (m := SPILLS.search(line)):
            current.update(stack=int(m["stack"]), stores=int(m["stores"]), loads=int(m["loads"]))
        elif current is not None and (m := USAGE.search(line)):
            current.update(registers=int(m["registers"]), smem=int(m["smem"] or 0))
    return kernels


def main(argv):
    budgets = read_budgets(argv[1])
    failures = []
    rows = []
    for log in argv[2:]:
        kernels = parse(log)
        if not kernels:
            failures.append(f"{log}: no ptxas lines (was -Xptxas -v passed?)")
        for kernel, demangled in zip(kernels, demangle([k["symbol"] for k in kernels])):
            name = short_name(demangled)
            budget = next(b for pattern, b in budgets if fnmatch.fnmatchcase(name, pattern))
            spills = kernel.get("stores", 0) + kernel.get("loads", 0)
            status = "ok"
            if spills:
                status = "SPILLS"
                failures.append(f"{name} ({kernel['arch']}): {kernel['stores']} B spill stores, {kernel['loads']} B loads")
            if kernel.get("registers", 0) > budget:
                status = "OVER BUDGET"
                failures.append(f"{name} ({kernel['arch']}): {kernel['registers']} registers > budget {budget}")
            rows.append((kernel["arch"], name, kernel.get("registers", 0), budget, spills, kernel.get("smem", 0), status))
    width = max((len(r[1]) for r in rows), default=10)
    print(f"{'arch':6} {'kernel':{width}} {'regs':>4} {'budget':>6} {'spill B':>7} {'smem B':>6}  status")
    for arch, name, registers, budget, spills, smem, status in sorted(rows):
        print(f"{arch:6} {name:{width}} {registers:4d} {budget:6d} {spills:7d} {smem:6d}  {status}")
    for failure in failures:
        print(f"REGISTER CHECK FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
