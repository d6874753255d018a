#!/usr/bin/env bash
# Cross-builds sluice for every firmware profile's target into dist/: static
# (CGO_ENABLED=0), reproducible (-trimpath, no build id or VCS stamp, a fixed
# version) and stripped, plus a .deb per Debian architecture (nfpm), and
# reports their sizes. Fails when a binary is over MAX_MIB (default 20) MiB.
#
#   scripts/dist.sh                       everything (make dist)
#   PROFILES="arm64 armv7" scripts/dist.sh   those profiles only
#   PACKAGES=0 scripts/dist.sh            binaries only
#   VERSION=1.2.0 SOURCE_DATE_EPOCH=... DIST_DIR=... GOCACHE=... also apply;
#   NFPM_BIN=... uses a built nfpm instead of `go run`.
#
# Targets come from the profiles' [build] sections (`sluice profile list`),
# so they cannot drift from the profiles.
set -euo pipefail
cd "$(dirname "$0")/.."

NFPM=github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2
MAX_MIB=${MAX_MIB:-20}
# The admin endpoint speaks HTTP/1.1 only: leaving net/http's HTTP/2 out
# saves about 0.6 MiB on every target.
BUILD_TAGS=${BUILD_TAGS:-nethttpomithttp2}
MAX_BYTES=$((MAX_MIB << 20))
DIST_DIR=${DIST_DIR:-dist}
PACKAGES=${PACKAGES:-1}

# The version: a release tag on HEAD, else the commit (Debian orders
# 0.0.0~git... before any release), else "0.0.0~dev".
if [ -z "${VERSION:-}" ]; then
	if tag=$(git describe --tags --exact-match --match 'v[0-9]*' 2>/dev/null); then
		VERSION=${tag#v}
	elif sha=$(git rev-parse --short=12 HEAD 2>/dev/null); then
		VERSION=0.0.0~git$sha
		[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || VERSION=$VERSION+dirty
	else
		VERSION=0.0.0~dev
	fi
fi
# File times in the packages: the commit's time, so two builds match.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1700000000)}
export SOURCE_DATE_EPOCH

mkdir -p "$DIST_DIR"
# A full build replaces what an earlier one left (other versions' packages).
if [ -z "${PROFILES:-}" ]; then
	rm -f "$DIST_DIR"/sluice-linux-* "$DIST_DIR"/sluice_*.deb "$DIST_DIR/SHA256SUMS"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

go build -o "$work/sluice-host" ./cmd/sluice
nfpm() {
	if [ -n "${NFPM_BIN:-}" ]; then "$NFPM_BIN" "$@"; else go run "$NFPM" "$@"; fi
}
# PROFILE TARGET, e.g. "armv7 linux/arm/v7".
mapfile -t profiles < <("$work/sluice-host" profile list | awk 'NR > 1 { print $1, $2 }')

# debArch maps a target to its Debian architecture ("" for none).
debArch() {
	case $1 in
	linux/amd64) echo amd64 ;;
	linux/arm64) echo arm64 ;;
	linux/arm/v7) echo armhf ;;  # Debian armhf: ARMv7 with VFPv3
	linux/arm/v6) echo armel ;;  # Debian armel on ARMv6 (Pi Zero, Pi 1)
	*) echo "" ;;
	esac
}

wanted() { [ -z "${PROFILES:-}" ] || [[ " $PROFILES " == *" $1 "* ]]; }

declare -A built=() packaged=()
for line in "${profiles[@]}"; do
	read -r profile target <<<"$line"
	wanted "$profile" || continue
	IFS=/ read -r goos goarch variant <<<"$target"
	name=sluice-$goos-$goarch$variant
	if [ -z "${built[$target]:-}" ]; then
		echo "build $name ($target, profile $profile)"
		CGO_ENABLED=0 GOOS=$goos GOARCH=$goarch GOARM=${variant#v} GOAMD64=v1 GOARM64=v8.0 \
			go build -trimpath -buildvcs=false -tags "$BUILD_TAGS" \
			-ldflags "-s -w -buildid= -X main.version=$VERSION" \
			-o "$DIST_DIR/$name" ./cmd/sluice
		built[$target]=$name
	fi

	# The dev profile is a workstation's: it gets no package.
	arch=$(debArch "$target")
	[ "$PACKAGES" = 1 ] && [ "$profile" != dev ] && [ -n "$arch" ] || continue
	if [ -n "${packaged[$arch]:-}" ]; then
		echo "profiles ${packaged[$arch]} and $profile both want the $arch package" >&2
		exit 1
	fi
	packaged[$arch]=$profile
	pkgdir=$work/pkg-$arch
	mkdir -p "$pkgdir"
	sed "s/@PROFILE@/$profile/g" packaging/sluice.toml >"$pkgdir/sluice.toml"
	# The conffile must load as it is (offline, as the gateway will).
	"$work/sluice-host" config show --config "$pkgdir/sluice.toml" >/dev/null
	{
		printf 'sluice (%s) unstable; urgency=medium\n\n  * Build of %s for %s boards.\n\n' "$VERSION" "$VERSION" "$profile"
		printf ' -- Sluice maintainers <sluice@sluice-gw.invalid>  %s\n' "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
	} | gzip -n -9 >"$pkgdir/changelog.gz"
	echo "package sluice_${VERSION}_$arch.deb (profile $profile)"
	DEB_ARCH=$arch VERSION=$VERSION BINARY=$DIST_DIR/${built[$target]} CONFFILE=$pkgdir/sluice.toml DOCDIR=$pkgdir \
		nfpm package --config packaging/nfpm.yaml --packager deb --target "$DIST_DIR/sluice_${VERSION}_$arch.deb" >/dev/null
done

if [ ${#built[@]} -eq 0 ]; then
	echo "no profile matches PROFILES=\"${PROFILES:-}\"" >&2
	exit 1
fi

# Sizes, and the checksums a second build must reproduce.
echo
too_big=0
(
	cd "$DIST_DIR"
	for f in $(printf '%s\n' "${built[@]}" | sort) $(ls sluice_"$VERSION"_*.deb 2>/dev/null); do
		awk -v f="$f" -v n="$(stat -c %s "$f")" 'BEGIN { printf "%-40s %6.1f MiB\n", f, n / 1048576 }'
	done
	sha256sum $(printf '%s\n' "${built[@]}" | sort) $(ls sluice_"$VERSION"_*.deb 2>/dev/null) >SHA256SUMS
)
for name in "${built[@]}"; do
	size=$(stat -c %s "$DIST_DIR/$name")
	if [ "$size" -gt "$MAX_BYTES" ]; then
		echo "$name is $size bytes, over the $MAX_MIB MiB target" >&2
		too_big=1
	fi
done
echo "version $VERSION; checksums in $DIST_DIR/SHA256SUMS"
exit $too_big
