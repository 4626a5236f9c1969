#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, default 60:
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      (SECONDS 0: only minimise, no fuzzing)
#
# Each target starts from its kept corpus (fuzz/corpus/TARGET/); afterwards that corpus and
# what the run found are minimised together and cut to the FUZZ_KEEP (default 30) inputs
# that reach the most code (scripts/fuzz-keep.py), small enough to commit. A
# crashing input is left in fuzz/artifacts/TARGET/ and the script exits non-zero: fix the
# decoder, then keep the input in fuzz/crashes/TARGET/ so tests/fuzz_replay.rs replays it
# on every run of the normal suite. Per-target libFuzzer output: fuzz/work/TARGET.log.
#
# Needs a nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
# Inputs kept per target: the corpus is committed, and a few hundred files in all is enough
# for the replay test to reach every check the fuzzers reached often.
keep=${FUZZ_KEEP:-30}
shift || true
case $secs in
  '' | *[!0-9]*)
    echo "SECONDS must be a whole number of seconds, not '$secs' (scripts/fuzz.sh [SECONDS] [TARGET...])" >&2
    exit 2
    ;;
esac

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz on a nightly toolchain is needed: rustup toolchain install nightly && cargo install cargo-fuzz" >&2
  exit 1
fi

# No sanitizer: the decoders are safe Rust, so AddressSanitizer would find nothing the
# panics do not, at half the speed. Debug assertions (overflow checks) stay on.
fuzz=(cargo +nightly fuzz)
flags=(-s none)
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" list)
fi

"${fuzz[@]}" build "${flags[@]}"
bin=fuzz/target/x86_64-unknown-linux-gnu/release
mkdir -p fuzz/work

crashed=()
# 0 seconds: no fuzzing, only minimise what fuzz/work/ holds into the kept corpus.
[ "$secs" -eq 0 ] && targets_run=() || targets_run=("${targets[@]}")
for t in "${targets_run[@]}"; do
  corpus=fuzz/corpus/$t
  work=fuzz/work/$t
  mkdir -p "$corpus" "$work"
  echo "== $t: ${secs}s"
  # New inputs land in $work; the kept corpus is read as seeds only.
  if ! "${fuzz[@]}" run "${flags[@]}" "$t" "$work" "$corpus" -- \
    -max_total_time="$secs" -max_len=16384 -timeout=10 -print_final_stats=1 \
    >"fuzz/work/$t.log" 2>&1; then
    crashed+=("$t")
    echo "   CRASH: see fuzz/work/$t.log and fuzz/artifacts/$t/" >&2
  fi
  grep -E '^#[0-9]+ +DONE|stat::number_of_executed_units|stat::new_units_added' "fuzz/work/$t.log" | sed 's/^/   /' || true
done

for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  # Minimise the kept corpus plus what this run found: libFuzzer's set-cover merge (what
  # `cargo fuzz cmin` runs), counting edges only, records what each input reaches; the
  # $keep inputs that together reach the most stay (scripts/fuzz-keep.py says why).
  control=fuzz/work/$t.merge
  rm -rf "$control" "fuzz/work/$t.min"
  mkdir -p "fuzz/work/$t.min" "fuzz/work/$t" "$corpus"
  "$bin/$t" -set_cover_merge=1 -use_counters=0 -max_len=16384 -merge_control_file="$control" \
    "fuzz/work/$t.min" "$corpus" "fuzz/work/$t" >"fuzz/work/$t.cmin.log" 2>&1
  echo "== $t: $(python3 scripts/fuzz-keep.py "$control" "$keep" "$corpus")"
done

if [ ${#crashed[@]} -gt 0 ]; then
  echo "crashed: ${crashed[*]}" >&2
  exit 1
fi
