#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need when it is
# missing (Debian packages), then vets, lints and runs every test, integration
# tests included (they start private Mosquitto, PostgreSQL and PgBouncer
# instances on free loopback ports), and each fuzz target for a bounded time.
#
#   ./test.sh            everything
#   FUZZTIME=30s ./test.sh   longer fuzzing (default 10s per target)
set -euo pipefail
cd "$(dirname "$0")"

FUZZTIME=${FUZZTIME:-10s}
# Go 1.26.8, which this machine ships, has standard-library vulnerabilities
# (net/http, crypto/tls, crypto/x509) fixed in later releases; CI and release
# builds use the patched toolchain, which the go command fetches from the Go
# module proxy. go.mod stays at 1.26 so any 1.26+ toolchain builds the code.
export GOTOOLCHAIN=${SLUICE_GOTOOLCHAIN:-go1.27.3}
STATICCHECK=honnef.co/go/tools/cmd/staticcheck@v0.8.2
GOVULNCHECK=golang.org/x/vuln/cmd/govulncheck@v1.9.0
VULNDB=golang.org/x/vulndb@v0.0.0-20261105234957-e22db6528018

step() { printf '\n== %s\n' "$*"; }

# --- what the tests need ------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
missing=()
have mosquitto || missing+=(mosquitto)
have mosquitto_pub || missing+=(mosquitto-clients)
have_pg || missing+=(postgresql)
have pgbouncer || missing+=(pgbouncer)
have coap-client-notls || missing+=(libcoap3-bin)  # a CoAP client nobody on the team wrote, plain and DTLS
have chromium || missing+=(chromium)          # the status page test renders in headless Chromium
have systemd-analyze || missing+=(systemd)   # the unit's verify and security checks
have qemu-aarch64-static || missing+=(qemu-user-static)  # the ARM builds, run under emulation
if [ ${#missing[@]} -gt 0 ]; then
	step "installing ${missing[*]}"
	sudo=""
	[ "$(id -u)" = 0 ] || sudo="sudo"
	export DEBIAN_FRONTEND=noninteractive
	$sudo apt-get update -qq
	$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the packaged services; the tests run their own private
# instances on free ports and need nothing of those.

# Integration tests fail instead of skipping when a service is missing.
export SLUICE_REQUIRE_SERVICES=1

step "go vet"
go vet ./...

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change: $unformatted" >&2
	exit 1
fi

step "staticcheck"
go run "$STATICCHECK" ./...

step "govulncheck (offline database from the Go module proxy)"
vulndir=$(go mod download -json "$VULNDB" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
dbdir=${TMPDIR:-/tmp}/sluice-vulndb
if [ ! -f "$dbdir/index/db.json" ]; then
	go run "golang.org/x/vulndb/cmd/indexdb@${VULNDB#*@}" -vulns "$vulndir/data/osv" -out "$dbdir"
fi
go run "$GOVULNCHECK" -db "file://$dbdir" ./...

step "systemd unit: verify, security exposure (2.0 or lower), sysusers, tmpfiles"
bash systemd/check.sh

step "go test -race (unit and integration)"
go test -race -count=1 -timeout 40m ./...

step "make dist: static binaries for every profile's target (each under 20 MiB), .deb packages"
scripts/dist.sh

step "reproducible: the arm64 binary and package, built again elsewhere with an empty cache"
timeout 30m scripts/check-reproducible.sh

step "ARM builds under qemu-user: version, profile list, the buffer tests on arm64, armv7, armv6"
timeout 30m scripts/check-qemu.sh

step "the amd64 package: dpkg-deb --info/--contents, lintian if installed, install and purge in a scratch root"
scripts/check-package.sh

step "fuzzing, $FUZZTIME per target"
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		echo "-- $pkg $target"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" "$pkg"
	done
done

step "all tests passed"
