#!/bin/sh
# Prints hpcvm-agent's version label (main.version): the last commit that
# changed guest/agent, plus "-dirty" if it has uncommitted changes. Not `git
# describe`: that changes with every commit, and so would the agent's bytes
# and the image build key that includes their sha256 (docs/images.md, Cache).
cd "$(dirname "$0")" || exit 1
v=$(git log -1 --format=%H -- . 2>/dev/null | cut -c1-12)
if [ -z "$v" ]; then
	echo dev
	exit 0
fi
[ -z "$(git status --porcelain -- . 2>/dev/null)" ] || v="$v-dirty"
echo "$v"
