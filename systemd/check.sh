#!/usr/bin/env bash
# Checks the shipped systemd files: the unit passes `systemd-analyze verify`,
# its hardening scores 2.0 or lower ("OK") in `systemd-analyze security`, and
# the sysusers and tmpfiles snippets apply to an empty root. test.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# verify wants ExecStart's binary to exist: point the unit at a fresh build.
go build -o "$tmp/sluice" ./cmd/sluice
sed "s#/usr/bin/sluice#$tmp/sluice#" systemd/sluice.service >"$tmp/sluice.service"
systemd-analyze verify "$tmp/sluice.service"
echo "systemd-analyze verify: ok"

out=$(systemd-analyze security --offline=true "$tmp/sluice.service" 2>&1)
score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for sluice.service: \([0-9.]*\).*/\1/p')
if ! awk -v s="$score" 'BEGIN { exit !(s != "" && s + 0 <= 2.0) }'; then
	printf '%s\n' "$out" | grep '✗' || true
	echo "systemd-analyze security: exposure '$score' is over 2.0" >&2
	exit 1
fi
echo "systemd-analyze security: exposure $score (2.0 or lower is OK)"

mkdir -p "$tmp/root/etc" "$tmp/root/usr/lib/sysusers.d" "$tmp/root/usr/lib/tmpfiles.d"
cp systemd/sluice.sysusers "$tmp/root/usr/lib/sysusers.d/sluice.conf"
cp systemd/sluice.tmpfiles "$tmp/root/usr/lib/tmpfiles.d/sluice.conf"
systemd-sysusers --root="$tmp/root"
grep -q '^sluice:' "$tmp/root/etc/passwd" || { echo "sysusers did not create the sluice user" >&2; exit 1; }
systemd-tmpfiles --root="$tmp/root" --create
# Compare the numeric group: stat names it from the host's group file.
gid=$(awk -F: '$1 == "sluice" { print $3 }' "$tmp/root/etc/group")
[ "$(stat -c '%a %g' "$tmp/root/etc/sluice")" = "750 $gid" ] || { echo "tmpfiles did not make /etc/sluice 0750 root:sluice" >&2; exit 1; }
echo "sysusers and tmpfiles: ok"
