#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600), two at a time, and prints each one's last
# status line. Crashes land in fuzz/artifacts/<target>/. Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${1:-600}"
TARGETS=(report onion_packet onion_layer hpke proto config)
cargo +nightly fuzz build -O
mkdir -p logs
run() {
    local t="$1"
    mkdir -p "corpus/$t" "artifacts/$t"
    # The binaries cargo fuzz built above, so later edits to the tree do not change a run.
    nice -n 10 "target/x86_64-unknown-linux-gnu/release/$t" "corpus/$t" "seeds/$t" \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" \
        > "logs/$t.log" 2>&1 || echo "$t: exited $? (see fuzz/logs/$t.log and fuzz/artifacts/$t/)"
}
for ((i = 0; i < ${#TARGETS[@]}; i += 2)); do
    run "${TARGETS[i]}" &
    if ((i + 1 < ${#TARGETS[@]})); then run "${TARGETS[i + 1]}" & fi
    wait
done
for t in "${TARGETS[@]}"; do
    echo "== $t: $(grep -E '^#[0-9]+' "logs/$t.log" | tail -1)"
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "logs/$t.log" || true
done
