#!/usr/bin/env bash
# Runs the ARM builds in dist/ under qemu-user (no binfmt needed): `version`
# and `profile list` for arm64, armv7 and armv6 (on an ARMv6 CPU, where the
# armv7 build must not run), then the buffer package's tests
# cross-compiled for arm64 and 32-bit ARM, so the on-disk format and the
# alignment of 64-bit fields are checked on 32-bit too. Every run is bounded.
# test.sh runs it after `make dist`.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "check-qemu: $*" >&2; exit 1; }
for q in qemu-aarch64-static qemu-arm-static; do
	command -v $q >/dev/null || fail "$q missing: apt-get install qemu-user-static"
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# NAME QEMU [QEMU-ARGS...]
check_binary() {
	local name=$1
	shift
	local bin=dist/sluice-linux-$name
	[ -x "$bin" ] || fail "$bin missing: run make dist first"
	out=$(timeout 60 "$@" "$bin" version) || fail "$name: version failed"
	grep -q '^sluice ' <<<"$out" || fail "$name: version printed: $out"
	list=$(timeout 60 "$@" "$bin" profile list) || fail "$name: profile list failed"
	grep -q '^armv7 .*linux/arm/v7' <<<"$list" || fail "$name: profile list printed: $list"
	echo "$name under $*: $(head -n1 <<<"$out"), profile list ok"
}
check_binary arm64 qemu-aarch64-static
check_binary armv7 qemu-arm-static -cpu cortex-a7
check_binary armv6 qemu-arm-static -cpu arm1176
# The armv7 build on an ARMv6 CPU dies at once (an illegal instruction), as
# the armv7 profile warns: the armv6 build is the one for those boards.
if out=$(timeout 60 qemu-arm-static -cpu arm1176 dist/sluice-linux-armv7 version 2>&1); then
	fail "the armv7 build ran on an ARMv6 CPU: $out"
fi
echo "armv7 on an ARMv6 CPU fails as expected: $(head -n1 <<<"$out")"

# The buffer tests. TestSurvivesSIGKILL re-executes its own binary, which
# qemu-user cannot do without binfmt; every other test runs.
# NAME GOARCH GOARM QEMU [QEMU-ARGS...]
check_buffer() {
	local name=$1 goarch=$2 goarm=$3
	shift 3
	CGO_ENABLED=0 GOOS=linux GOARCH=$goarch GOARM=$goarm go test -c -o "$tmp/buffer.$name.test" ./buffer
	(cd buffer && timeout 600 "$@" "$tmp/buffer.$name.test" -test.count=1 -test.timeout=9m -test.skip '^TestSurvivesSIGKILL$') ||
		fail "buffer tests failed for $name"
	echo "buffer tests pass on $name under $*"
}
check_buffer arm64 arm64 "" qemu-aarch64-static
check_buffer armv7 arm 7 qemu-arm-static -cpu cortex-a7
check_buffer armv6 arm 6 qemu-arm-static -cpu arm1176
