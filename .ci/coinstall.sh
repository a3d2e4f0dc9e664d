#!/usr/bin/env bash
# SAELens beside neuronscope-tl: in a fresh virtual environment at $1, `pip install sae-lens <this package>` must
# resolve (pip --dry-run: the resolution without the download), and to TransformerLens 3.x, the line both accept
# (sae-lens requires transformer-lens<4).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
start=$(date +%s)
python -m venv --clear "$venv"
"$venv/bin/pip" install -q torch==2.13.0
log=$(mktemp)
"$venv/bin/pip" install --dry-run sae-lens . > "$log" 2>&1 || { cat "$log"; echo "coinstall.sh: pip could not resolve sae-lens beside neuronscope-tl" >&2; exit 1; }
would=$(grep '^Would install' "$log" || true)
rm -f "$log"
for pkg in sae-lens neuronscope-tl transformer-lens-3; do
  if ! grep -q -- "$pkg" <<<"$would"; then
    echo "coinstall.sh: the resolution lacks $pkg: $would" >&2
    exit 1
  fi
done
echo "coinstall.sh: resolves: $(grep -o 'sae-lens-[0-9][0-9.]*\|neuronscope-tl-[0-9][0-9.]*\|transformer-lens-[0-9][0-9.]*\|transformers-[0-9][0-9.]*' <<<"$would" | tr '\n' ' ')($(( $(date +%s) - start )) s)"
