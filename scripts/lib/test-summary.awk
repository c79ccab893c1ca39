# The one summary of scripts/test, from cargo test's output (libtest and libtest-mimic print
# `test result: ok. 3 passed; 1 failed; 2 ignored; ...` per binary). A binary that dies before its
# result line (a panic in main, a signal) counts as one failure, named by cargo's "Running" line.
# Variables: elapsed (seconds), rc (cargo's exit status). Exit status 1 when anything failed.
/^ *(Running|Doc-tests) / { bins++; current = $0; sub(/^ *(Running|Doc-tests) /, "", current); have[bins] = 0; name[bins] = current }
/^test result: / {
  have[bins] = 1
  for (i = 1; i <= NF; i++) {
    if ($(i + 1) ~ /^passed;?$/) passed += $i
    if ($(i + 1) ~ /^failed;?$/) failed += $i
    if ($(i + 1) ~ /^ignored;?$/) skipped += $i
  }
}
/ \.\.\. ignored/ { line = $0; sub(/^test /, "", line); sub(/ +\.\.\. ignored.*$/, "", line); skips[++nskips] = line }
/ \.\.\. FAILED$/ { line = $0; sub(/^test /, "", line); sub(/ +\.\.\. FAILED$/, "", line); fails[++nfails] = line }
END {
  for (b = 1; b <= bins; b++) if (!have[b]) { failed++; fails[++nfails] = "test binary " name[b] " ended without a result (crashed?)" }
  if (rc != 0 && failed == 0) { failed++; fails[++nfails] = "cargo test exited " rc " with no failed test named (see above)" }
  print ""
  if (nskips) { print "skipped (with their reasons):"; for (i = 1; i <= nskips; i++) print "  " skips[i] }
  if (nfails) { print "failed:"; for (i = 1; i <= nfails; i++) print "  " fails[i] }
  printf "tests: %d passed, %d failed, %d skipped (%d test binaries, %d s)\n", passed, failed, skipped, bins, elapsed
  exit (failed > 0)
}
