#!/usr/bin/env bash
# Which commit the files in DIR (default .) are, for a report's header; never a commit they are not.
#
#   $CLORA_COMMIT when set (the caller's word: a copy of the tree sent to another machine may carry
#   a stale .git or none), else git's HEAD when the tracked files are exactly HEAD's and nothing
#   untracked is there; else "unknown (why)". Always exits 0.
cd "${1:-.}" 2> /dev/null || { echo "unknown (no folder ${1:-.})"; exit 0; }
if [ -n "${CLORA_COMMIT:-}" ]; then echo "$CLORA_COMMIT (from CLORA_COMMIT)"; exit 0; fi
head=$(git rev-parse --short HEAD 2> /dev/null) || { echo "unknown (git finds no repository here)"; exit 0; }
changed=$(git status --porcelain 2> /dev/null) || { echo "unknown (git status fails here)"; exit 0; }
if [ -z "$changed" ]; then
  echo "$head"
else
  echo "unknown (the files differ from git HEAD $head in $(printf '%s\n' "$changed" | wc -l) paths)"
fi
