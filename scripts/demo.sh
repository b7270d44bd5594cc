#!/usr/bin/env bash
# The main demo: run the inbox daemon once over the sample batches on the embedded default
# (samples/model, samples/editor), then show what it made: the checkpoint versions, the evaluation
# files, the rejected batch in failed/ with its error file, and an HTML report.
#
#   bash scripts/demo.sh
#
# Everything it writes goes to demo/ (recreated on each run). DAFNET_BUILD_PATH picks another SwiftPM
# scratch folder than .build.
set -euo pipefail
cd "$(dirname "$0")/.."

for need in samples/model/config.json samples/editor/editor.json; do
    if [ ! -f "$need" ]; then
        echo "demo: $need is missing: the embedded default model and editor are not built yet" >&2
        echo "      (see the README: dafnet pretrain, dafnet dafset build, dafnet train-editor)" >&2
        exit 1
    fi
done

echo "== building (release)"
SCRATCH="${DAFNET_BUILD_PATH:-.build}"
swift build -c release --scratch-path "$SCRATCH" --product dafnet 2>&1 | tail -n 1
DAFNET="$(swift build -c release --scratch-path "$SCRATCH" --show-bin-path)/dafnet"

echo
echo "== a fresh demo/inbox with the sample batches"
rm -rf demo
mkdir -p demo/inbox
cp samples/inbox/*.jsonl demo/inbox/
ls -1 demo/inbox

echo
echo "== dafnet watch --once --inbox demo/inbox --store demo/checkpoints"
# Exit status 4: some batches went to failed/ (the sample inbox holds one malformed batch on purpose).
status=0
"$DAFNET" watch --once --inbox demo/inbox --store demo/checkpoints || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 4 ]; then exit "$status"; fi

echo
echo "== dafnet checkpoints list --store demo/checkpoints"
"$DAFNET" checkpoints list --store demo/checkpoints

echo
echo "== evaluation files (demo/checkpoints/evaluations/)"
ls -1 demo/checkpoints/evaluations/
last="$(ls -1 demo/checkpoints/evaluations/*.v*.json | tail -n 1)"
echo
echo "-- $last (head)"
head -n 40 "$last"

echo
echo "== demo/inbox: done/ and failed/"
ls -1 demo/inbox/done demo/inbox/failed
for f in demo/inbox/failed/*.error.json; do
    echo
    echo "-- $f"
    cat "$f"
done

echo
echo "== dafnet report --store demo/checkpoints"
"$DAFNET" report --store demo/checkpoints
