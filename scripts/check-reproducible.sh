#!/usr/bin/env bash
# Builds the arm64 binary and package twice, the second time from a copy of
# the tree in another directory with an empty build cache, and checks that
# both builds have the same sha256: nothing of the machine, the path or the
# cache leaks into what ships. test.sh runs it.
#
#   scripts/check-reproducible.sh            profile arm64
#   PROFILES=armv7 scripts/check-reproducible.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export PROFILES=${PROFILES:-arm64}
tmp=$(mktemp -d)
trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT

# Both builds get the version and file times of this tree.
export VERSION=${VERSION:-0.0.0~repro}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1700000000)}

# nfpm is a tool, not what ships: build it once for both.
GOBIN=$tmp/bin go install "$(sed -n 's/^NFPM=//p' scripts/dist.sh)"
export NFPM_BIN=$tmp/bin/nfpm

DIST_DIR=$tmp/first scripts/dist.sh >/dev/null

mkdir "$tmp/elsewhere"
tar --exclude=./dist --exclude=./.git --exclude='./sluice-data' -cf - . | tar -xf - -C "$tmp/elsewhere"
(cd "$tmp/elsewhere" && GOCACHE=$tmp/gocache DIST_DIR=$tmp/second scripts/dist.sh >/dev/null)

if ! diff <(cd "$tmp/first" && cat SHA256SUMS) <(cd "$tmp/second" && cat SHA256SUMS); then
	echo "the two builds differ (profiles $PROFILES)" >&2
	exit 1
fi
echo "reproducible (profiles $PROFILES):"
cat "$tmp/first/SHA256SUMS"
