#!/usr/bin/env bash
# Fuzzes the parsers of outside input with libFuzzer + AddressSanitizer: the JSONL batch parser, the
# safetensors reader, the zstd blob reader, archive restore and the tokenizer.json loader
# (Sources/dafnet-fuzz). Each harness runs SECONDS (default 600) from its corpus in fuzz/corpus/<name>,
# adding the new inputs it finds there; a crash is written to fuzz/crashes/ and makes the run fail.
#
#   bash scripts/fuzz.sh [SECONDS] [HARNESS…]
#
# Prints, per harness, the executions, the corpus size and whether it crashed. `swift test` replays
# the committed corpora (a regression test) without the fuzzer.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"; shift || true
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(batch safetensors blob archive tokenizer)

swift build --scratch-path .build-fuzz --product dafnet-fuzz \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING 2>&1 | tail -n 1
bin="$(swift build --scratch-path .build-fuzz --show-bin-path)/dafnet-fuzz"
mkdir -p fuzz/crashes
status=0
for h in "${harnesses[@]}"; do
    mkdir -p "fuzz/corpus/$h"
    log="$(mktemp)"
    set +e
    DAFNET_FUZZ_HARNESS="$h" "$bin" "fuzz/corpus/$h" -max_total_time="$seconds" -print_final_stats=1 \
        -max_len=65536 -timeout=20 -rss_limit_mb=4096 -artifact_prefix="fuzz/crashes/$h-" >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo "?")
    files=$(ls "fuzz/corpus/$h" | wc -l)
    if [ "$rc" -ne 0 ]; then status=1; echo "$h: CRASHED after $execs executions (rc $rc); see fuzz/crashes/ and $log"; tail -n 30 "$log"
    else echo "$h: $execs executions in ${seconds} s, no crash; corpus $files files"; fi
done
exit "$status"
