"""Kernel tests: prints the worst kernel-vs-twin errors per dtype at the end of a GPU run."""

from __future__ import annotations

import tolerances


def pytest_terminal_summary(terminalreporter):
    if not tolerances.WORST:
        return
    terminalreporter.write_line("kernel parity, worst per kernel and dtype (max abs err, NMSE):")
    for (kernel, dtype), (err, nmse) in sorted(tolerances.WORST.items()):
        terminalreporter.write_line(f"  {kernel:18s} {dtype:9s} {err:.3e} {nmse:.3e}")
