"""Checks on rendered manifests that a schema cannot make (run by deploy/validate.sh).

For each rendered kustomization (one multi-document YAML file):

- the callgate Deployment's `--config PATH` lies in a directory mounted whole (no subPath, so a
  ConfigMap update swaps the symlink and hot reload sees it) from a ConfigMap in the same render;
- that ConfigMap's policy passes `callgate check`;
- probes (/healthz, /readyz), resources and a non-root, read-only container are set;
- terminationGracePeriodSeconds exceeds the policy's drain_delay + shutdown_grace;
- the in-memory store runs one replica (the Deployment and the HPA's bounds), since a second one
  would keep its own counters; a Redis store's host is a Service of the same render.

Usage: python deploy/check_rendered.py [--callgate .venv/bin/callgate] RENDERED.yaml...
Exit 0 when every file passes, 1 otherwise (every problem printed).
"""

from __future__ import annotations

import argparse
import os
import posixpath
import subprocess
import sys
import tempfile
from typing import Any
from urllib.parse import urlsplit

import yaml

Doc = dict[str, Any]


def _find(docs: list[Doc], kind: str, name: str) -> Doc | None:
    for doc in docs:
        if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name:
            return doc
    return None


def _config_path(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _check_policy(callgate: list[str], text: str) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "callgate.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        env = {k: v for k, v in os.environ.items() if k != "CALLGATE_UPSTREAM_URL"}
        proc = subprocess.run(
            [*callgate, "check", path], capture_output=True, text=True, env=env, check=False
        )
    return proc.returncode, proc.stdout + proc.stderr


def check_render(path: str, callgate: list[str] | None = None) -> list[str]:
    """Every problem found in one rendered file (empty: it passes).

    `callgate` is the command that runs the CLI (default: this Python's `-m proxy`).
    """
    callgate = callgate or [sys.executable, "-m", "proxy"]
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if isinstance(d, dict)]
    problems: list[str] = []

    deploy = _find(docs, "Deployment", "callgate")
    if deploy is None:
        return ["no Deployment named callgate"]
    pod = deploy["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod.get("containers", [])}
    container = containers.get("callgate")
    if container is None:
        return ["the callgate Deployment has no container named callgate"]

    probes = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, want in probes.items():
        got = container.get(probe, {}).get("httpGet", {}).get("path")
        if got != want:
            problems.append(f"{probe} path is {got!r}, expected {want!r}")
    resources = container.get("resources", {})
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in resources.get(part, {}):
                problems.append(f"resources.{part}.{res} is not set")
    pod_sc = pod.get("securityContext", {})
    ctr_sc = container.get("securityContext", {})
    if not (ctr_sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if not ctr_sc.get("readOnlyRootFilesystem"):
        problems.append("readOnlyRootFilesystem is not set")
    grace_period = pod.get("terminationGracePeriodSeconds")
    if not grace_period:
        problems.append("terminationGracePeriodSeconds is not set")

    args = [*container.get("command", []), *container.get("args", [])]
    config_path = _config_path(args)
    if config_path is None:
        return [*problems, "the callgate container has no --config argument"]
    config_dir, config_key = posixpath.split(config_path)
    mount = next(
        (m for m in container.get("volumeMounts", []) if m["mountPath"] == config_dir), None
    )
    if mount is None:
        return [*problems, f"no volume is mounted at {config_dir} (the directory of --config)"]
    if mount.get("subPath") or mount.get("subPathExpr"):
        problems.append(f"the policy mount at {config_dir} uses subPath: it would never update")
    volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), None)
    cm_name = (volume or {}).get("configMap", {}).get("name")
    if cm_name is None:
        return [*problems, f"the volume mounted at {config_dir} is not a ConfigMap"]
    cm = _find(docs, "ConfigMap", cm_name)
    if cm is None:
        return [*problems, f"the ConfigMap {cm_name} is not part of the render"]
    text = cm.get("data", {}).get(config_key)
    if text is None:
        return [*problems, f"the ConfigMap {cm_name} has no key {config_key}"]

    rc, out = _check_policy(callgate, text)
    if rc != 0:
        return [*problems, f"callgate check rejects the policy in ConfigMap {cm_name}:\n{out}"]
    resolved = yaml.safe_load(out.split("\n", 1)[1]) if "\n" in out else {}
    store = (resolved or {}).get("store", {})
    backend = store.get("backend")
    server = (resolved or {}).get("server", {})
    drain = float(server.get("drain_delay", 0)) + float(server.get("shutdown_grace", 0))
    if grace_period and drain >= grace_period:
        problems.append(
            f"terminationGracePeriodSeconds ({grace_period}) must exceed server.drain_delay + "
            f"server.shutdown_grace ({drain:g}): the kubelet would kill callgate mid-drain"
        )

    replicas = deploy["spec"].get("replicas", 1)
    hpa = next(
        (
            d
            for d in docs
            if d.get("kind") == "HorizontalPodAutoscaler"
            and d["spec"]["scaleTargetRef"].get("name") == "callgate"
        ),
        None,
    )
    max_replicas = hpa["spec"]["maxReplicas"] if hpa else replicas
    if backend == "memory" and (replicas > 1 or max_replicas > 1):
        problems.append(
            f"store.backend is memory but replicas={replicas}, HPA maxReplicas={max_replicas}: "
            "each replica would keep its own counters (use the redis overlay)"
        )
    if backend == "redis":
        url = urlsplit(store.get("url", ""))
        host, port = url.hostname or "", url.port or 6379
        service_name = host.split(".")[0]
        svc = _find(docs, "Service", service_name)
        if svc is None:
            problems.append(f"store.url names host {host!r}, not a Service of this render")
        elif not any(p.get("port") == port for p in svc["spec"].get("ports", [])):
            problems.append(f"the Service {service_name} does not expose port {port}")
    if not problems:
        print(
            f"  {os.path.basename(path)}: policy in ConfigMap {cm_name} passes callgate check "
            f"(store: {backend}); replicas {replicas}, HPA max {max_replicas}"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callgate", help="the callgate executable (default: python -m proxy)")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    failed = False
    for path in args.files:
        for problem in check_render(path, [args.callgate] if args.callgate else None):
            failed = True
            print(f"FAIL {path}: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
