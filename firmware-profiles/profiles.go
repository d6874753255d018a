// Package firmwareprofiles holds the board profiles: one TOML file per board
// class with its build target and tuned defaults, embedded in the binary.
package firmwareprofiles

import (
	"embed"
	"io/fs"
	"sort"
	"strings"
)

//go:embed *.toml
var files embed.FS

// Names lists the profiles, sorted.
func Names() []string {
	entries, _ := fs.ReadDir(files, ".")
	var names []string
	for _, e := range entries {
		if name, ok := strings.CutSuffix(e.Name(), ".toml"); ok {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}

// Read returns a profile's TOML text; ok is false for an unknown name.
func Read(name string) (text []byte, ok bool) {
	if name == "" || strings.ContainsAny(name, "/\\.") {
		return nil, false
	}
	b, err := files.ReadFile(name + ".toml")
	return b, err == nil
}
