"""GPU tier: report each failure (and each slow test) the moment it happens.

bench/gpu_session.sh runs this tier under a hard time cap with ``-q``; pytest prints failure details only at the
end of the session, so a run cut off by the cap would lose them.  This hook writes them to the terminal as they
happen (the junit XML is also written only at the end)."""
import sys


def pytest_runtest_logreport(report):
    if report.failed:
        print(f"\n[gpu tier] FAILED {report.nodeid} ({report.when}, {report.duration:.1f}s)\n{report.longreprtext}\n",
              file=sys.stderr, flush=True)
    elif report.when == "call" and report.duration > 10:
        print(f"\n[gpu tier] slow: {report.nodeid} {report.duration:.1f}s", file=sys.stderr, flush=True)
