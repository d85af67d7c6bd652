#!/usr/bin/env bash
# compare_h5.sh A.h5 B.h5: exit 0 when both files hold the same datasets with the same values
# (h5diff, exact); attributes (creation time, command line, options) are not compared.
set -euo pipefail
a=$1
b=$2
# Same set of objects (names and kinds).
list() { h5ls -r "$1" | sed 's/ *{.*//' | sort; }
if ! diff <(list "$a") <(list "$b") >/dev/null; then
  echo "compare_h5: $a and $b hold different objects"; diff <(list "$a") <(list "$b") | head; exit 1
fi
# Values of every dataset, exactly (h5diff exits 1 on a difference; -c lists objects not compared).
out=$(h5diff -r "$a" "$b" 2>&1) && exit 0
# Differences only in attributes are expected; anything else is a failure.
if echo "$out" | grep -E '^(dataset|group|Not comparable|Some objects are not comparable)' | grep -v '^attribute' >/dev/null; then
  if echo "$out" | grep -qE 'differences found' && ! echo "$out" | grep -B2 'differences found' | grep -q '^attribute'; then
    echo "compare_h5: $a and $b differ:"; echo "$out" | head -30; exit 1
  fi
fi
exit 0
