#!/usr/bin/env bash
# Criterion benches of the resilience primitives (breaker admit+record, rate-limit
# check; single-threaded and contended from 2 threads), written to bench/RESULTS.md.
# Target: breaker admit+record <= 100 ns uncontended.
#
# Usage: bench/resilience.sh [measurement-seconds]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-3}"
OUT=bench/RESULTS.md
LOG="$(mktemp)"
trap 'rm -f "$LOG" "$LOG.section"' EXIT

for b in breaker rate_limit; do
  cargo bench -q -p breakwater-resilience --bench "$b" -- --warm-up-time 1 --measurement-time "$SECS" 2>/dev/null | tee -a "$LOG"
done

{
  echo "<!-- resilience: begin -->"
  echo "## Resilience primitives (criterion)"
  echo
  echo "Measured $(date -u +%Y-%m-%dT%H:%MZ) by \`bench/resilience.sh $SECS\` on $(nproc) cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo))."
  echo "Each figure is criterion's estimate of one operation (the middle of its confidence interval)."
  echo
  echo "| benchmark | time per operation |"
  echo "|---|---|"
  # criterion prints the name on one line (or before "time:" on the same line when short)
  # and "time:   [low est high]" after it.
  awk '
    /time:/ { line=$0; name=prev; if ($1 != "time:") { name=$1 }
              sub(/.*\[/, "", line); split(line, t, " "); print "| " name " | " t[3] " " t[4] " |"; next }
    NF { prev=$1 }' "$LOG"
  echo
  echo "Target: breaker admit+record <= 100 ns uncontended."
  echo "<!-- resilience: end -->"
} > "$LOG.section"

touch "$OUT"
if grep -q "<!-- resilience: begin -->" "$OUT"; then
  awk -v f="$LOG.section" '
    /<!-- resilience: begin -->/ { while ((getline l < f) > 0) print l; skip=1; next }
    /<!-- resilience: end -->/ { skip=0; next }
    !skip { print }' "$OUT" > "$OUT.new" && mv "$OUT.new" "$OUT"
else
  { [ -s "$OUT" ] || printf '# Benchmark results\n\nEvery figure here was measured by a script in bench/ on the machine named with it.\n\n'; cat "$LOG.section"; echo; } >> "$OUT"
fi
echo "wrote $OUT"
