#!/usr/bin/env bash
# Checks a built sluice .deb (default: the amd64 one in dist/): its control
# data and file list, lintian when it is installed, and a real install and
# purge with dpkg into a scratch root (--root, maintainer scripts with
# $DPKG_ROOT), which leaves this machine untouched. test.sh runs it after
# `make dist`.
#
#   scripts/check-package.sh [PACKAGE.deb]
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:-$(ls -t dist/sluice_*_amd64.deb 2>/dev/null | head -n1)}
[ -f "$deb" ] || { echo "no package to check: run make dist first" >&2; exit 1; }
fail() { echo "check-package: $*" >&2; exit 1; }

info=$(dpkg-deb --info "$deb")
printf '%s\n' "$info"
arch=$(dpkg-deb --field "$deb" Architecture)
[ "$(dpkg-deb --field "$deb" Package)" = sluice ] || fail "package name"
[ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles)" = /etc/sluice/sluice.toml ] ||
	fail "/etc/sluice/sluice.toml is not the (only) conffile"
for script in postinst prerm postrm; do
	grep -q " $script " <<<"$info" || fail "no $script"
done

contents=$(dpkg-deb --contents "$deb")
printf '%s\n' "$contents"
expect() { # MODE PATH
	grep -qE "^$1 root/root +[0-9]+ [0-9-]+ [0-9:]+ \.$2/?\$" <<<"$contents" || fail "no $2 with mode $1"
}
expect -rwxr-xr-x /usr/bin/sluice
expect -rw-r--r-- /lib/systemd/system/sluice.service
expect -rw-r--r-- /usr/lib/sysusers.d/sluice.conf
expect -rw-r--r-- /usr/lib/tmpfiles.d/sluice.conf
expect -rw-r--r-- /etc/sluice/sluice.toml
expect drwx------ /etc/sluice/credentials
expect drwxr-x--- /var/lib/sluice
expect -rw-r--r-- /usr/share/doc/sluice/copyright
expect -rw-r--r-- /usr/share/doc/sluice/changelog.gz
expect -rw-r--r-- /usr/share/sluice/mosquitto-gateway.conf

# The conffile names the board's profile and no secret.
conf=$(dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./etc/sluice/sluice.toml)
profile=$(sed -n 's/^profile = "\(.*\)"$/\1/p' <<<"$conf")
case $arch in
amd64 | arm64) [ "$profile" = "$arch" ] ;;
armhf) [ "$profile" = armv7 ] ;;
armel) [ "$profile" = armv6 ] ;;
*) false ;;
esac || fail "$arch package has profile '$profile'"
! grep -qiE 'postgres(ql)?://|password' <<<"$conf" || fail "the conffile holds a DSN or password"

if command -v lintian >/dev/null 2>&1; then
	lintian --fail-on error "$deb"
else
	echo "lintian not installed (about 100 packages with its Perl dependencies): skipped"
fi

# Install and purge for real, into a scratch root.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/etc"
touch "$root/var/lib/dpkg/status" "$root/var/lib/dpkg/available"
dpkgr() { dpkg --root="$root" --force-script-chrootless --force-unsafe-io --force-architecture "$@"; }
dpkgr -i "$deb"
[ "$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${db:Status-Status}' sluice)" = installed ] || fail "not installed"
grep -q '^ /etc/sluice/sluice.toml [0-9a-f]\{32\}$' "$root/var/lib/dpkg/status" || fail "conffile not registered"
[ -x "$root/usr/bin/sluice" ] || fail "no binary in the scratch root"
if command -v systemd-sysusers >/dev/null 2>&1; then
	grep -q '^sluice:' "$root/etc/passwd" || fail "postinst did not create the sluice user"
	[ "$(stat -c %a "$root/etc/sluice")" = 750 ] || fail "postinst did not apply tmpfiles to /etc/sluice"
fi
if [ "$arch" = "$(dpkg --print-architecture)" ]; then
	"$root/usr/bin/sluice" config show --config "$root/etc/sluice/sluice.toml" >/dev/null || fail "the installed conffile does not load"
fi
dpkgr --purge sluice
[ ! -e "$root/usr/bin/sluice" ] && [ ! -e "$root/etc/sluice/sluice.toml" ] || fail "purge left package files"
[ -z "$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${db:Status-Status}' sluice 2>/dev/null)" ] ||
	[ "$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${db:Status-Status}' sluice)" = not-installed ] || fail "still registered after purge"
echo "package $deb: ok (installed and purged in a scratch root)"
