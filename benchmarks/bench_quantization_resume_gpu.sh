#!/usr/bin/env bash
# Resume after a crash, on a GPU box (#24 §3; docs/quantization.md says how to set the box up):
# the Llama-3-8B shape at SAMPLES x 2048 with finished layers kept (quantization.resume),
#   1. whole:   the single pass keeping every layer (its cost against the plain single pass),
#   2. killed:  the same, SIGKILLed when layer KILL_AFTER is on disk (REQUANT_KILL_AT),
#               or at KILL_AT (e.g. inputs-16-recorded: once the inputs entering layer 17
#               are kept too, mid-way through layer 17; 16 layers finished either way),
#   3. resumed: the same again: it reads layers 1..KILL_AFTER back and calibrates the rest.
# INPUTS_EVERY: quantization.resume_inputs_every (8; 0: re-derive through every stored layer).
# JSON per step under OUT. Each step is one process (~1.6x the wall time it reports).
#   SAMPLES=512 KILL_AFTER=16 OUT=/tmp/out benchmarks/bench_quantization_resume_gpu.sh [steps]
set -uo pipefail
cd "$(dirname "$0")/.."
samples=${SAMPLES:-512}
kill_after=${KILL_AFTER:-16}
out=${OUT:-.}
store=${STORE:-runs/bench-layer-store}
kill_at=${KILL_AT:-layer-$((kill_after - 1))-recorded}
bench=(python benchmarks/bench_quantization_gpu.py --samples "$samples" --variants requant-store
       --inputs-every "${INPUTS_EVERY:-8}")
for step in ${@:-whole killed resumed}; do
  case $step in
    whole)   rm -rf "$store/whole"
             "${bench[@]}" --store "$store/whole" --out "$out/resume-whole.json"
             rm -rf "$store/whole" ;;
    killed)  rm -rf "$store/killed"
             REQUANT_KILL_AT="$kill_at" "${bench[@]}" \
               --store "$store/killed"
             echo "killed run: exit $? (137 = SIGKILL), layers kept: $(ls "$store/killed" | grep -c '^layer-.*json')" ;;
    resumed) "${bench[@]}" --store "$store/killed" --out "$out/resume-resumed.json"
             rm -rf "$store/killed" ;;
  esac
done
