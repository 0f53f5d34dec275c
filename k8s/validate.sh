#!/usr/bin/env bash
# Renders every kustomization under k8s/ that is meant to be applied, then
#   1. validates the rendered objects against the Kubernetes OpenAPI schemas
#      (kubernetes-validate, strict: unknown fields fail; schemas bundled in
#      the package, no network),
#   2. runs checkov's Kubernetes checks on them (offline: --skip-download).
# Exits non-zero on the first failing step; prints what it checked.
#
# Tools (see k8s/README.md "Validation"): kustomize v5+ as `kustomize` or
# inside `kubectl` (`kubectl kustomize`), kubernetes-validate, checkov.
# They are looked up in $K8S_TOOLS_BIN (default: build/k8s-tools/bin, the
# venv CI installs them into), then on PATH.
#
#   k8s/validate.sh                 # all targets
#   K8S_VERSION=1.33.0 k8s/validate.sh
#   K8S_RENDER_DIR=out/k8s k8s/validate.sh   # keep the rendered YAML there
set -euo pipefail

K8S_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$K8S_DIR/.." && pwd)"
K8S_VERSION="${K8S_VERSION:-1.32.0}"
TOOLS_BIN="${K8S_TOOLS_BIN:-$REPO_DIR/build/k8s-tools/bin}"
export PATH="$TOOLS_BIN:$PATH"

# What gets applied: the two serving overlays and the jobs. base/ alone is
# not deployable (its TF Serving image is a logical name the overlays set).
TARGETS=(overlays/brute-force overlays/scann jobs)

fail() { echo "validate.sh: FAIL: $*" >&2; exit 1; }
missing() {
  echo "validate.sh: MISSING TOOL: $*" >&2
  echo "  install: see k8s/README.md \"Validation\"" >&2
  exit 3
}

# --- tools -----------------------------------------------------------------
if command -v kustomize >/dev/null 2>&1; then
  RENDER=(kustomize build)
  KUSTOMIZE_VERSION="$(kustomize version 2>/dev/null | grep -oE 'v[0-9]+\.[0-9]+\.[0-9]+' | head -1)"
  RENDERER="kustomize $KUSTOMIZE_VERSION ($(command -v kustomize))"
elif command -v kubectl >/dev/null 2>&1; then
  RENDER=(kubectl kustomize)
  KUSTOMIZE_VERSION="$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')"
  RENDERER="kubectl kustomize, kustomize ${KUSTOMIZE_VERSION:-unknown} ($(command -v kubectl))"
else
  missing "neither kustomize nor kubectl"
fi
# The manifests use `labels:` (kustomize >= 4.1); kubectl < 1.21 bundles
# kustomize v2 (Debian's kubernetes-client 1.20 does), which cannot render them.
major="${KUSTOMIZE_VERSION#v}"; major="${major%%.*}"
[[ "$major" =~ ^[0-9]+$ && "$major" -ge 5 ]] \
  || missing "kustomize v5+ needed, found '${KUSTOMIZE_VERSION:-none}' via $RENDERER"
command -v kubernetes-validate >/dev/null 2>&1 || missing "kubernetes-validate"
command -v checkov >/dev/null 2>&1 || missing "checkov"

echo "renderer:            $RENDERER"
echo "kubernetes-validate: $(kubernetes-validate --version) (schemas of Kubernetes $K8S_VERSION, strict)"
echo "checkov:             $(checkov --version 2>/dev/null | tail -1)"

# --- render ----------------------------------------------------------------
if [[ -n "${K8S_RENDER_DIR:-}" ]]; then
  OUT="$K8S_RENDER_DIR"; rm -rf "$OUT"; mkdir -p "$OUT"
else
  OUT="$(mktemp -d "${TMPDIR:-/tmp}/segrec-k8s.XXXXXX")"
  trap 'rm -rf "$OUT"' EXIT
fi

echo
echo "== render"
for t in "${TARGETS[@]}"; do
  f="$OUT/${t//\//_}.yaml"
  "${RENDER[@]}" "$K8S_DIR/$t" >"$f" || fail "render $t"
  # Every image must have been resolved by an images: entry to name:tag.
  bad="$(grep -E '^\s*image: ' "$f" | grep -vE 'image: [^ ]+/[^ ]+:[^ ]+' || true)"
  [[ -z "$bad" ]] || fail "$t: unresolved image name(s): $bad"
  kinds="$(sed -n 's/^kind: //p' "$f" | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')"
  echo "  $t -> $(grep -c '^kind: ' "$f") objects: $kinds"
done

# --- schemas ---------------------------------------------------------------
echo
echo "== kubernetes-validate --strict -k $K8S_VERSION"
kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$OUT"/*.yaml \
  || fail "schema validation (run without --quiet for details: kubernetes-validate --strict -k $K8S_VERSION FILE)"
echo "  all objects valid"

# --- security lint ---------------------------------------------------------
echo
echo "== checkov --framework kubernetes"
# Skipped checks are annotated on the resource they concern
# (metadata.annotations checkov.io/skipN: CKV_...=reason), each with its reason.
checkov -d "$OUT" --framework kubernetes --skip-download --compact --quiet \
  || fail "checkov"

echo
echo "validate.sh: OK (${#TARGETS[@]} targets: ${TARGETS[*]})"
