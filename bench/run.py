"""callgate's load benchmark: one command, everything on loopback, bounded in time.

    python -m bench.run                     # 5 s per measurement after 1 s of warm-up, 3 rounds
    python -m bench.run --quick             # ~1 s each (CI smoke)
    python -m bench.run --uvloop            # every process on uvloop instead of asyncio
    python bench/run.py --duration 10 --concurrency 64 --json results.json

It starts, each in its own process: a fast mock upstream (a ~1 KB chat completion with one tool
call, or a 20-chunk SSE stream), a bare aiohttp pass-through proxy (the physical floor for an
aiohttp proxy), and callgate (`python -m proxy serve`) with a realistic policy: a CEL rule and an
arguments schema, a rate limit and a budget that never block (huge max_calls and max_spend), and
a hash-chained audit file. callgate's request log goes to a file, as a container's stdout would.
A separate load-generator process then measures, at fixed concurrency and for a fixed time:
direct to the upstream, then the bare proxy and callgate in alternating rounds (`--rounds`,
default 3: back-to-back pairs are the least disturbed by other work on the machine),
non-streaming and streaming; then the same at concurrency 1 for the latency callgate adds. It
prints a table (each scenario's median round, with the proxy's CPU time per request and its
resident memory) and the ratios against the targets (throughput >= 85% of the bare proxy
non-streaming, >= 80% streaming, as the median of the per-round ratios; added p50 latency at
low load < 1 ms). Exit status 1 if any measurement had errors or no requests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from bench.common import COMPLETION, STREAM, STREAM_CHUNKS, free_port  # noqa: E402

POLICY = """\
# The benchmark's policy: every gate runs on every call, none blocks.
upstream:
  base_url: "http://127.0.0.1:{upstream_port}/v1"
  timeout: 60
principal:
  from: ["header:x-callgate-principal", "body:user", "api_key"]
on_block: reprompt
budgets:
  research: {{max_spend: "1000000000.00", window: 3600}}
tools:
  search_web:
    rules:
      - name: no_pii
        deny_if: 'args.query.lowerAscii().contains("ssn")'
    arguments_schema: {{type: object, required: [query]}}
    rate_limit: {{max_calls: 1000000000, window: 60}}
    budget: {{ledger: research, cost: "0.001"}}
  delete_file: {{allow: false}}
audit:
  log: false
  file: "{audit_file}"
  redact: [api_key, password]
store: {{backend: memory}}
"""

# `--audit-variants`: more callgate processes, alike but for the audit section, measured in the
# same alternating rounds: what audit before delivery costs, and what each fsync setting adds.
AUDIT_VARIANTS = ("cg-noaudit", "cg-batch", "cg-always")
# `--otel`: callgate with OpenTelemetry tracing on, every request sampled, its spans exported
# over OTLP/HTTP to the mock upstream: what tracing costs per request (`callgate` is the same
# policy with tracing off).
OTEL_VARIANT = "cg-otel"


# `--redis` / `--workers N`: callgate with a heavier policy (five CEL rules, the schema, the
# rate limit, the budget and the audit file) on a Redis store the benchmark starts, measured in
# the same alternating rounds: one process ("cg-redis"), and N workers ("cg-redis-wN").
# `--redis-py`: also that one process with the store's hot path on redis-py's asyncio client
# rather than its slim client ("cg-redis-py"; a URL query string selects redis-py).
HEAVY_RULES = """\
      - name: no_secrets
        deny_if: 'args.query.contains("password")'
      - name: short_query
        deny_if: 'size(args.query) > 2000'
      - name: no_internal_hosts
        deny_if: 'args.query.startsWith("http://10.")'
      - name: no_shell
        deny_if: 'args.query.matches("^\\\\$\\\\(")'
"""


# `--native`: the same callgates again, run from the compiled build (proxy/native.py, as the
# container image ships it): "cg-native" beside "callgate", "cg-redis-native" beside
# "cg-redis". The build goes to build/native (about 1.5 minutes).
NATIVE_SUFFIX = "-native"
NATIVE_DIR = ROOT / "build" / "native"

REDIS_PY_VARIANT = "cg-redis-py"
REDIS_PY_QUERY = "?health_check_interval=0"  # changes nothing but the client


def _redis_policy(policy: str, redis_url: str) -> str:
    rule = "deny_if: 'args.query.lowerAscii().contains(\"ssn\")'\n"
    assert rule in policy
    heavy = policy.replace(rule, rule + HEAVY_RULES)
    return heavy.replace(
        "store: {backend: memory}", f'store: {{backend: redis, url: "{redis_url}"}}'
    )


def _variant_policy(policy: str, name: str, upstream: str = "") -> str:
    if name == "cg" + NATIVE_SUFFIX:
        return policy
    if name == OTEL_VARIANT:
        return f"{policy}telemetry: {{traces: true, endpoint: '{upstream}/v1/traces'}}\n"
    head, _, rest = policy.partition("audit:\n")
    audit, _, store = rest.partition("store:")
    if name == "cg-noaudit":
        return f"{head}audit: {{log: false}}\nstore:{store}"
    return f"{head}audit:\n  fsync: {name.removeprefix('cg-')}\n{audit}store:{store}"


# Run callgate's own CLI, with uvloop hidden so it runs on asyncio like the other processes.
_NO_UVLOOP = "; ".join(
    (
        "import sys",
        "sys.modules['uvloop'] = None",
        "from proxy.cli import main",
        "raise SystemExit(main())",
    )
)


@dataclass
class Scenario:
    mode: str  # "non-streaming" | "streaming"
    target: str  # "direct" | "bare" | "callgate"
    concurrency: int
    round: int = 1  # bare and callgate are measured in alternating rounds

    @property
    def stream(self) -> bool:
        return self.mode == "streaming"


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc): the workers of `serve --workers N`."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except (OSError, ValueError):
        return []


def _memory_mb(pid: int) -> tuple[float, float] | None:
    """(resident, peak resident) MiB of a process (Linux /proc), or None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None


class Servers:
    """The three servers under test, each its own process; stopped on exit whatever happens."""

    def __init__(
        self,
        workdir: Path,
        loop: str,
        chunk_delay_ms: float,
        variants: tuple[str, ...] = (),
        redis_url: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.variants = variants
        self.redis_url = redis_url
        self.loop = loop
        self.chunk_delay_ms = chunk_delay_ms
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {name: free_port() for name in ("direct", "bare", "callgate", *variants)}
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CALLGATE_UPSTREAM_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL")
            and not k.startswith("OTEL_")  # tracing only where a variant turns it on
        }
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self.audit_file = workdir / "audit.jsonl"
        self.callgate_log = workdir / "callgate.log"
        self.config = workdir / "callgate.yaml"

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.ports[target]}"

    def _start(self, name: str, args: list[str], log: Path) -> None:
        with open(log, "wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def start(self) -> None:
        loop = ["--loop", self.loop]
        self._start(
            "direct",
            [
                "-m",
                "bench.mock_upstream",
                "--port",
                str(self.ports["direct"]),
                "--chunk-delay-ms",
                str(self.chunk_delay_ms),
                *loop,
            ],
            self.workdir / "upstream.log",
        )
        self._start(
            "bare",
            [
                "-m",
                "bench.bare_proxy",
                "--port",
                str(self.ports["bare"]),
                "--upstream",
                self.url("direct"),
                *loop,
            ],
            self.workdir / "bare.log",
        )
        self.config.write_text(
            POLICY.format(upstream_port=self.ports["direct"], audit_file=self.audit_file)
        )
        serve = [
            "serve",
            "--config",
            str(self.config),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports["callgate"]),
        ]
        cli = ["-m", "proxy"] if self.loop == "uvloop" else ["-c", _NO_UVLOOP]
        self._start("callgate", [*cli, *serve], self.callgate_log)
        policy = self.config.read_text()
        for name in self.variants:
            config = self.workdir / f"{name}.yaml"
            audit = self.workdir / f"{name}.audit.jsonl"
            if name.startswith("cg-redis"):
                assert self.redis_url is not None
                url = self.redis_url
                if name == REDIS_PY_VARIANT:
                    url += REDIS_PY_QUERY
                text = _redis_policy(policy, url)
            else:
                text = _variant_policy(policy, name, self.url("direct"))
            config.write_text(text.replace(str(self.audit_file), str(audit)))
            args = ["serve", "--config", str(config), "--host", "127.0.0.1"]
            args += ["--port", str(self.ports[name])]
            if name.startswith("cg-redis-w"):
                args += ["--workers", name.removeprefix("cg-redis-w")]
            run = cli
            if name.endswith(NATIVE_SUFFIX):
                # `-c` and `-m` put the working directory (the source) first on sys.path.
                hide = "sys.modules['uvloop'] = None; " if self.loop != "uvloop" else ""
                code = f"import sys; sys.path.insert(0, {str(NATIVE_DIR)!r}); {hide}"
                run = ["-c", code + "from proxy.cli import main; raise SystemExit(main())"]
            self._start(name, [*run, *args], self.workdir / f"{name}.log")
        for name in ("direct", "bare", "callgate", *self.variants):
            self._wait_healthy(name)
        for name in ("callgate", *self.variants):
            self._wait_healthy(name, "/readyz")

    def _wait_healthy(self, name: str, path: str = "/healthz", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(self.url(name) + path, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not healthy after {timeout:.0f} s")
            time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 20) -> str:
        log = {
            "direct": "upstream.log",
            "bare": "bare.log",
            "callgate": "callgate.log",
        }.get(name, f"{name}.log")
        try:
            text = (self.workdir / log).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu(self, target: str) -> float | None:
        proc = self.procs.get(target)
        if proc is None:
            return None
        total = _cpu_seconds(proc.pid)
        for child in _children(proc.pid):  # the workers of `serve --workers N`
            seconds = _cpu_seconds(child)
            if total is not None and seconds is not None:
                total += seconds
        return total

    def memory(self, target: str) -> tuple[float, float] | None:
        proc = self.procs.get(target)
        return _memory_mb(proc.pid) if proc is not None else None

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every server (callgate flushes its audit file), SIGKILL what lingers."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


def run_load(
    servers: Servers,
    sc: Scenario,
    number: int,
    duration: float,
    warmup: float,
    loop: str,
    principals: int,
) -> dict[str, Any]:
    args = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        servers.url(sc.target) + "/v1/chat/completions",
        "--concurrency",
        str(sc.concurrency),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--principals",
        str(principals),
        # Fresh principals per run: what one run records in the store does not slow the next.
        "--principal-prefix",
        f"run{number}-user-",
        "--loop",
        loop,
    ]
    if sc.stream:
        args.append("--stream")
    front = sc.target if sc.target != "direct" else None
    cpu_before = servers.cpu(front) if front else None
    proc = subprocess.run(
        args,
        cwd=ROOT,
        env=servers.env,
        capture_output=True,
        text=True,
        timeout=warmup + duration + 60,
        check=False,
    )
    cpu_after = servers.cpu(front) if front else None
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    result.update(mode=sc.mode, target=sc.target, round=sc.round)
    memory = servers.memory(front) if front else None
    result["rss_mb"], result["peak_rss_mb"] = memory if memory else (None, None)
    result["cpu_us_per_req"] = (
        (cpu_after - cpu_before) / result["total_requests"] * 1e6
        if cpu_before is not None and cpu_after is not None and result["total_requests"]
        else None
    )
    return result


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, spec)


def print_table(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'mode':<14} {'target':<9} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'ttfb p50':>8} {'proxy CPU/req':>13} {'RSS MiB':>7} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    last = None
    order: list[tuple[str, str, int]] = []
    for r in results:
        if key(r) not in order:
            order.append(key(r))
    for k in sorted(order, key=lambda k: (-k[2], k[0] != "non-streaming", order.index(k))):
        r = representative([x for x in results if key(x) == k])
        assert r is not None
        group = (r["mode"], r["concurrency"])
        if last is not None and group != last:
            print()
        last = group
        ttfb = r["ttfb_p50_ms"] if r["stream"] else None
        cpu = r["cpu_us_per_req"]
        print(
            f"{r['mode']:<14} {r['target']:<9} {r['concurrency']:>4} {r['rps']:>9.0f} "
            f"{_fmt(r['p50_ms'], '.2f'):>8} {_fmt(r['p99_ms'], '.2f'):>8} "
            f"{_fmt(ttfb, '.2f'):>8} {(_fmt(cpu, '.0f') + ' us') if cpu else '-':>13} "
            f"{_fmt(r.get('rss_mb'), '.1f'):>7} {r['errors']:>6}"
        )


def key(r: dict[str, Any]) -> tuple[str, str, int]:
    return (r["mode"], r["target"], r["concurrency"])


def representative(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of one scenario's rounds, the run with the median throughput."""
    if not runs:
        return None
    return sorted(runs, key=lambda r: r["rps"])[(len(runs) - 1) // 2]


def _rounds(results: list[dict[str, Any]], mode: str, high: int) -> dict[int, dict[str, float]]:
    """Per alternating round at the high concurrency: each proxy target's requests/s."""
    rounds: dict[int, dict[str, float]] = {}
    for r in results:
        if r["mode"] == mode and r["concurrency"] == high and r["target"] != "direct":
            rounds.setdefault(r["round"], {})[r["target"]] = r["rps"]
    return rounds


def summarize(results: list[dict[str, Any]], high: int) -> dict[str, Any]:
    """The ratios against the targets, printed; returned as a dict for --json."""

    def pick(mode: str, target: str, conc: int) -> dict[str, Any] | None:
        return representative([r for r in results if key(r) == (mode, target, conc)])

    summary: dict[str, Any] = {}
    lines: list[tuple[str, str, str]] = []
    for mode, goal in (("non-streaming", 0.85), ("streaming", 0.80)):
        # Each round measures bare then callgate back to back: their ratio is the figure least
        # disturbed by the machine's other work; the median over rounds is reported.
        rounds = _rounds(results, mode, high)
        ratios = sorted(
            pair["callgate"] / pair["bare"]
            for pair in rounds.values()
            if pair.get("bare") and "callgate" in pair
        )
        if ratios:
            ratio = statistics.median(ratios)
            summary[f"throughput_ratio_{mode}"] = ratio
            summary[f"throughput_ratios_{mode}"] = ratios
            spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
            verdict = "met" if ratio >= goal else "MISSED"
            lines.append(
                (
                    f"callgate/bare throughput, {mode}",
                    f"{ratio:.2f}",
                    f">= {goal:.2f}: {verdict}; median of {len(ratios)} rounds{spread}",
                )
            )
    variants = sorted({r["target"] for r in results if r["target"].startswith("cg-")})
    for mode in ("non-streaming", "streaming"):
        for variant in ("callgate", *variants):
            ratios = sorted(
                by_target[variant] / by_target["bare"]
                for by_target in _rounds(results, mode, high).values()
                if by_target.get("bare") and variant in by_target
            )
            if ratios and variants:
                ratio = statistics.median(ratios)
                summary[f"throughput_ratio_{mode}_{variant}"] = ratio
                spread = f"({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
                lines.append((f"{variant}/bare throughput, {mode}", f"{ratio:.2f}", spread))
    for mode in ("non-streaming", "streaming"):
        cg, bare = pick(mode, "callgate", 1), pick(mode, "bare", 1)
        if cg and bare and cg["p50_ms"] is not None and bare["p50_ms"] is not None:
            added = cg["p50_ms"] - bare["p50_ms"]
            summary[f"added_p50_ms_{mode}"] = added
            if mode == "non-streaming":
                target = "< 1 ms: " + ("met" if added < 1.0 else "MISSED")
            else:
                target = "(whole stream; no target)"
            lines.append((f"added p50 at concurrency 1, {mode}", f"{added:+.3f} ms", target))
    for mode in ("non-streaming", "streaming"):
        cg, bare = pick(mode, "callgate", high), pick(mode, "bare", high)
        if cg and bare and cg["cpu_us_per_req"] and bare["cpu_us_per_req"]:
            extra = cg["cpu_us_per_req"] - bare["cpu_us_per_req"]
            summary[f"added_cpu_us_{mode}"] = extra
            lines.append((f"callgate CPU per request over bare, {mode}", f"{extra:+.0f} us", ""))
            # What the throughput ratio would be with a core to itself: less sensitive to other
            # load on the machine than the req/s ratio.
            cpu_ratio = bare["cpu_us_per_req"] / cg["cpu_us_per_req"]
            summary[f"cpu_ratio_{mode}"] = cpu_ratio
            lines.append((f"bare/callgate CPU per request, {mode}", f"{cpu_ratio:.2f}", ""))
    peaks = {
        t: max(
            (r["peak_rss_mb"] for r in results if r["target"] == t and r.get("peak_rss_mb")),
            default=None,
        )
        for t in ("bare", "callgate")
    }
    if peaks["bare"] and peaks["callgate"]:
        summary["peak_rss_mb"] = peaks
        lines.append(
            (
                "peak resident memory, callgate / bare",
                f"{peaks['callgate']:.0f} / {peaks['bare']:.0f} MiB",
                "",
            )
        )
    for label, value, target in lines:
        print(f"{label:<48} {value:>9}   {target}".rstrip())
    return summary


def audit_check(servers: Servers) -> str:
    """`callgate audit verify` on the audit file written under load (after callgate stopped)."""
    if not servers.audit_file.exists():
        return "no audit file written"
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", str(servers.audit_file)],
        cwd=ROOT,
        env=servers.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return (proc.stdout + proc.stderr).strip().replace(str(servers.audit_file), "audit.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="callgate load benchmark (loopback only, bounded in time)"
    )
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per run (default 1)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections (default 32)")
    parser.add_argument("--principals", type=int, default=32, help="distinct principals")
    parser.add_argument("--quick", action="store_true", help="~1 s per run (CI smoke)")
    parser.add_argument("--uvloop", action="store_true", help="run every process on uvloop")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="pause between stream chunks"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="alternating bare/callgate rounds at the high concurrency (default 3; --quick 1)",
    )
    parser.add_argument(
        "--audit-variants",
        action="store_true",
        help="also measure callgate without an audit file and with audit.fsync batch / always",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="also measure callgate with a heavier policy (5 CEL rules) on a Redis store"
        " (a redis-server the benchmark starts)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="also measure that Redis configuration served by `callgate serve --workers N`",
    )
    parser.add_argument(
        "--redis-py",
        action="store_true",
        help="also measure the --redis configuration with the store's hot path on redis-py",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="also measure callgate with OpenTelemetry tracing on (every request, OTLP/HTTP)",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="also measure callgate (and the --redis configuration) compiled with mypyc"
        " (proxy/native.py; built into build/native first)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    variants = tuple(AUDIT_VARIANTS) if args.audit_variants else ()
    if args.redis or args.workers or args.redis_py:
        variants += ("cg-redis",)
    if args.redis_py:
        variants += (REDIS_PY_VARIANT,)
    if args.workers and args.workers > 1:
        variants += (f"cg-redis-w{args.workers}",)
    if args.otel:
        variants += (OTEL_VARIANT,)
    if args.native:
        variants += ("cg" + NATIVE_SUFFIX,)
        if "cg-redis" in variants:
            variants += ("cg-redis" + NATIVE_SUFFIX,)
        print(f"compiling the hot path into {NATIVE_DIR} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "proxy.native", "build", str(NATIVE_DIR)],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )

    duration = args.duration if args.duration is not None else (1.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.25 if args.quick else 1.0)
    loop = "asyncio"
    if args.uvloop:
        if importlib.util.find_spec("uvloop") is None:
            print("--uvloop: uvloop is not installed (pip install uvloop)", file=sys.stderr)
            return 2
        loop = "uvloop"
    high = args.concurrency
    rounds = max(1, args.rounds if args.rounds is not None else (1 if args.quick else 3))
    modes = ("non-streaming", "streaming")
    scenarios = [Scenario(mode, "direct", high) for mode in modes]
    scenarios += [
        Scenario(mode, target, high, n)
        for n in range(1, rounds + 1)
        for mode in modes
        for target in ("bare", "callgate", *variants)
    ]
    scenarios += [
        Scenario(mode, target, 1) for mode in modes for target in ("direct", "bare", "callgate")
    ]

    server_src = (ROOT / "proxy" / "server.py").read_text()
    callgate_loop = loop
    if loop == "uvloop" and "uvloop" not in server_src:
        callgate_loop = "asyncio (proxy/server.py does not use uvloop)"
    print(
        f"callgate benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}; loop: {loop} (callgate: {callgate_loop})"
    )
    print(
        f"{duration:g} s measured per run after {warmup:g} s warm-up; concurrency {high} "
        f"({rounds} alternating rounds of bare and callgate; the table shows each one's median) "
        f"and 1; "
        f"{args.principals} principals; loopback only; load average before: {_loadavg()}"
    )
    print(
        f"mock upstream: {len(COMPLETION)}-byte completion with one tool call; "
        f"{STREAM_CHUNKS}-chunk SSE stream ({sum(map(len, STREAM))} bytes with [DONE])"
        + (f", {args.chunk_delay_ms:g} ms between chunks" if args.chunk_delay_ms else "")
    )
    print(
        "callgate: rule (CEL) + arguments schema + rate limit + budget, memory store, "
        "audit file on (audit.log off), request log lines to a file"
    )
    print()

    results: list[dict[str, Any]] = []
    failed = False
    with (
        tempfile.TemporaryDirectory(prefix="callgate-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        redis_url = None
        if any(v.startswith("cg-redis") for v in variants):
            from bench.bench_store import start_redis

            redis_proc, redis_url, redis_dir = start_redis()
            stack.callback(shutil.rmtree, redis_dir, ignore_errors=True)
            stack.callback(redis_proc.wait, 10)
            stack.callback(redis_proc.terminate)
        servers = Servers(Path(tmp), loop, args.chunk_delay_ms, variants, redis_url)
        try:
            servers.start()
            for number, sc in enumerate(scenarios):
                result = run_load(servers, sc, number, duration, warmup, loop, args.principals)
                results.append(result)
                if result["errors"] or not result["requests"]:
                    failed = True
                    print(
                        f"! {sc.mode} {sc.target} c={sc.concurrency}: {result['requests']} "
                        f"requests, errors {result['error_kinds']}",
                        file=sys.stderr,
                    )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"benchmark aborted: {exc}", file=sys.stderr)
            failed = True
        finally:
            codes = servers.stop()
        if results:
            print_table(results)
            print()
            summary = summarize(results, high)
        else:
            summary = {}
        log_bytes = servers.callgate_log.stat().st_size if servers.callgate_log.exists() else 0
        audit = audit_check(servers)
        print(f"callgate log: {log_bytes / 1e6:.1f} MB written; audit: {audit}")
        print(f"load average after: {_loadavg()} (other work on the machine skews every figure)")
        if codes.get("callgate") not in (0, None):
            print(f"callgate exited with {codes['callgate']}:", file=sys.stderr)
            print(servers.log_tail("callgate"), file=sys.stderr)
            failed = True
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(
                orjson.dumps(
                    {
                        "loop": loop,
                        "duration": duration,
                        "warmup": warmup,
                        "concurrency": high,
                        "rounds": rounds,
                        "results": results,
                        "summary": summary,
                        "audit": audit,
                    },
                    option=orjson.OPT_INDENT_2,
                )
            )
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
