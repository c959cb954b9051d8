"""The campaign: generate, play, triage until the time is up; one directory per new
signature (the case, the minimised case, reproduce.sh, a draft registry entry); a summary
(results/fuzz/<run>/summary.json) and a table."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.artifacts import write_script
from testbed.bugs.signature import SILENT_EXITS, exit_of
from testbed.device import DEVICE_TYPE
from testbed.fuzz import corpus
from testbed.fuzz.generator import generate
from testbed.fuzz.grammar import Case
from testbed.fuzz.player import play
from testbed.fuzz.result import PlayResult
from testbed.fuzz.triage import Finding, draft_entry, findings, minimise, slug
from testbed.host import debugger
from testbed.waiting import Deadline


@dataclass
class Seen:
    finding: Finding
    count: int
    first_case: int
    directory: str = ""
    minimised_in: int = 0


@dataclass
class Campaign:
    arch: str
    qemu: Path
    version: str
    seed: int
    seconds: float
    outdir: Path
    minimise: bool = True
    max_cases: int | None = None
    device: str = DEVICE_TYPE
    """The QEMU device every case plugs (`--device`)."""
    cases: int = 0
    errors: int = 0
    replayed_for_site: int = 0
    """Silent crashes replayed under a debugger for their site (no kernel log line)."""
    elapsed: float = 0.0
    seen: dict[str, Seen] = field(default_factory=dict)
    pairs: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """(state, request, fd kind) -> cases (testbed.fuzz.grammar.coverage_key)."""
    fds: dict[str, int] = field(
        default_factory=lambda: {
            "cases_counted": 0,
            "before_total": 0,
            "after_total": 0,
            "growth_total": 0,
            "cases_grown": 0,
            "max_growth": 0,
        }
    )

    def replay_signatures(self, case: Case) -> set[str]:
        return {f.signature for f in findings(self._with_site(case, play(case, self.qemu)))}

    def run(self, progress: bool = True) -> dict[str, Any]:
        self.outdir.mkdir(parents=True, exist_ok=True)
        self._cases_log = (self.outdir / "cases.jsonl").open("w")
        started = time.monotonic()
        # The campaign's time: cases are played until it is spent (not a wait for anything).
        budget = Deadline(self.seconds)
        try:
            for index in itertools.count():
                if budget.expired or (self.max_cases is not None and index >= self.max_cases):
                    break
                case = generate(self.arch, self.seed, index, self.device)
                result = self._with_site(case, play(case, self.qemu))
                self.cases += 1
                self._account(case, result, budget)
                if progress and self.cases % 50 == 0:
                    rate = self.cases / max(1e-9, time.monotonic() - started) * 60
                    print(
                        f"  {self.arch}: {self.cases} cases, {len(self.seen)} signatures, "
                        f"{rate:.0f}/min",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            self._cases_log.close()
            self.elapsed = time.monotonic() - started
            summary = self.summary()
            (self.outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _with_site(self, case: Case, result: PlayResult) -> PlayResult:
        """A crash that printed nothing and has no site from the kernel's log (unreadable,
        rate-limited, or a SIGBUS, which it does not log) is replayed under a debugger for
        its site, so that two such crashes are told apart on any host."""
        if exit_of(result.returncode) not in SILENT_EXITS or result.segfault:
            return result
        if not debugger.available():
            return result
        again = play(case, self.qemu, debug=True)
        self.replayed_for_site += 1
        if again.returncode == result.returncode and again.died_in == result.died_in:
            result.segfault = again.segfault
        return result

    def _account(self, case: Case, result: PlayResult, budget: Deadline) -> None:
        if result.error:
            self.errors += 1
        for pair in result.pairs:
            self.pairs[pair] += 1
        growth = result.fd_growth
        if growth is not None:
            fds = self.fds
            fds["cases_counted"] += 1
            fds["before_total"] += result.fds_before
            fds["after_total"] += result.fds_after
            if growth > 0:
                fds["growth_total"] += growth
                fds["cases_grown"] += 1
                fds["max_growth"] = max(fds["max_growth"], growth)
        found = findings(result)
        line = {
            "index": case.index,
            "last_state": case.last_state,
            "reconnect": case.reconnect if case.reconnects else None,
            "seconds": round(result.seconds, 3),
            "fds_before": result.fds_before,
            "fds_after": result.fds_after,
            "fd_growth": growth,
            "signatures": [f.signature for f in found],
        }
        if hasattr(self, "_cases_log"):
            self._cases_log.write(json.dumps(line) + "\n")
        for f in found:
            seen = self.seen.get(f.signature)
            if seen is not None:
                seen.count += 1
                continue
            seen = Seen(f, 1, case.index)
            self.seen[f.signature] = seen
            self._save(seen, case, result, budget)

    def _save(self, seen: Seen, case: Case, result: PlayResult, budget: Deadline) -> None:
        f = seen.finding
        name = f"{len(self.seen):03d}-{slug(f.signature)}"
        directory = self.outdir / "findings" / name
        directory.mkdir(parents=True, exist_ok=True)
        seen.directory = str(directory)
        (directory / "case.json").write_text(case.dumps() + "\n")
        (directory / "stderr.txt").write_text(result.stderr)
        data = {**f.to_json(), "fds_before": result.fds_before, "fds_after": result.fds_after}
        (directory / "finding.json").write_text(json.dumps(data, indent=1) + "\n")
        minimal = case
        if self.minimise and f.known is None and f.kind != "hang":
            seconds = min(60.0, budget.remaining())
            minimal, used = minimise(case, f.signature, self.replay_signatures, seconds=seconds)
            seen.minimised_in = used
        (directory / "minimal.json").write_text(minimal.dumps() + "\n")
        corpus.save(directory / "corpus.json", minimal, [f])
        argv = [sys.executable, "-m", "testbed", "fuzz", "--arch", case.arch]
        argv += ["--qemu", str(self.qemu), "--replay", str((directory / "minimal.json").resolve())]
        script = (
            "#!/bin/sh\n# Replays the minimised case; exit 1 when QEMU shows a finding.\n"
            f"# Signature: {f.signature}\n"
            f"cd {shlex.quote(str(Path.cwd().resolve()))}\n"
            f"exec {shlex.join(argv)}\n"
        )
        write_script(directory / "reproduce.sh", script)
        if f.known is None:
            entry = draft_entry(f, minimal, self.version, slug(f.signature))
            (directory / "registry-draft.toml").write_text(entry)

    def summary(self) -> dict[str, Any]:
        minutes = self.elapsed / 60
        coverage: dict[str, dict[str, int]] = {}
        by_fd: dict[str, dict[str, dict[str, int]]] = {}
        for (state, request, fd), n in sorted(self.pairs.items()):
            row = coverage.setdefault(state, {})
            row[request] = row.get(request, 0) + n
            by_fd.setdefault(state, {}).setdefault(request, {})[fd] = n
        return {
            "arch": self.arch,
            "device": self.device,
            "qemu": str(self.qemu),
            "version": self.version,
            "seed": self.seed,
            "cases": self.cases,
            "seconds": round(self.elapsed, 1),
            "cases_per_minute": round(self.cases / minutes, 1) if minutes else 0.0,
            "errors": self.errors,
            "replayed_for_site": self.replayed_for_site,
            "signatures": [
                {
                    **dataclasses.asdict(s.finding),
                    "count": s.count,
                    "first_case": s.first_case,
                    "new": s.finding.known is None,
                    "directory": s.directory,
                    "minimise_replays": s.minimised_in,
                }
                for s in self.seen.values()
            ],
            "coverage": coverage,
            "coverage_fds": by_fd,
            "pairs_exercised": sum(len(row) for row in coverage.values()),
            "triples_exercised": len(self.pairs),
            "fds": dict(self.fds),
        }


def table(summary: dict[str, Any]) -> str:
    sigs = summary["signatures"]
    new = sum(1 for s in sigs if s["new"])
    states = sorted(summary["coverage"])
    lines = [
        f"arch {summary['arch']}  seed {summary['seed']}  QEMU {summary['version']}  "
        f"device {summary.get('device', DEVICE_TYPE)}",
        f"{'cases':>8} {'minutes':>8} {'cases/min':>10} {'signatures':>11} {'new':>5} "
        f"{'known':>6} {'state x request':>16} {'x fd kind':>10}",
        f"{summary['cases']:>8} {summary['seconds'] / 60:>8.1f} "
        f"{summary['cases_per_minute']:>10.1f} {len(sigs):>11} {new:>5} {len(sigs) - new:>6} "
        f"{summary['pairs_exercised']:>16} {summary.get('triples_exercised', 0):>10}",
    ]
    fds = summary.get("fds")
    if fds:
        lines.append(
            f"fds (QEMU, before/after each case, device stopped): {fds['cases_counted']} cases "
            f"counted, total {fds['before_total']} -> {fds['after_total']}, growth "
            f"+{fds['growth_total']} in {fds['cases_grown']} case(s) (max +{fds['max_growth']})"
        )
    lines += ["", "signatures:"]
    for s in sorted(sigs, key=lambda s: (s["known"] is not None, -s["count"])):
        tag = f"known {s['known']}" if s["known"] else "NEW"
        lines.append(f"  {s['count']:>5}x  [{tag}] {s['signature']}  (first at {s['where']})")
    lines += ["", "coverage (state: request x count):"]
    for state in states:
        row = ", ".join(f"{r} {n}" for r, n in sorted(summary["coverage"][state].items()))
        lines.append(f"  {state}: {row}")
    by_fd = summary.get("coverage_fds", {})
    lines += ["", "fd kinds (state: request: kind x count):"]
    for state in sorted(by_fd):
        for request, kinds in sorted(by_fd[state].items()):
            if set(kinds) != {"-"}:
                row = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                lines.append(f"  {state}: {request}: {row}")
    return "\n".join(lines)


def replay(case: Case, qemu: Path, *, debug: bool = False) -> list[Finding]:
    """The findings of one case; ``debug``: under a debugger (a silent crash's site)."""
    return findings(play(case, qemu, debug=debug))
