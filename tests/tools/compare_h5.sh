#!/usr/bin/env bash
# compare_h5.sh A.h5 B.h5: exit 0 when both files hold the same objects and every dataset has the
# same values (h5diff -r, exact). Attributes (creation time, command line, options) may differ.
set -euo pipefail
a=$1
b=$2
list() { h5ls -r "$1" | sed 's/ *{.*//' | sort; }
if ! diff <(list "$a") <(list "$b") >/dev/null; then
  echo "compare_h5: $a and $b hold different objects"
  diff <(list "$a") <(list "$b") | head
  exit 1
fi
# h5diff reports per object "dataset: <...>" or "attribute: <...>", then "N differences found".
{ h5diff -r "$a" "$b" || true; } | awk -v a="$a" -v b="$b" '
  /^dataset: / { kind = "dataset"; name = $0 }
  /^attribute: / { kind = "attribute" }
  /differences found/ && kind == "dataset" && $1 + 0 > 0 { print "compare_h5: " a " vs " b ": " name ": " $1 " differences"; bad = 1 }
  /not comparable/ { print "compare_h5: " $0; bad = 1 }
  END { exit bad }'
