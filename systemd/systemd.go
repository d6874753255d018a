// Package systemd embeds the gateway's systemd files (the unit, the sysusers
// and tmpfiles snippets) so that `sluice provision` can put them in a
// gateway's bundle. It holds no code that talks to systemd.
package systemd

import _ "embed"

// Unit is sluice.service.
//
//go:embed sluice.service
var Unit []byte

// Sysusers is sluice.sysusers: the gateway's system user.
//
//go:embed sluice.sysusers
var Sysusers []byte

// Tmpfiles is sluice.tmpfiles: /etc/sluice and its credentials directory.
//
//go:embed sluice.tmpfiles
var Tmpfiles []byte
