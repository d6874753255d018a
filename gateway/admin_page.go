package gateway

import (
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"net/http"
	"regexp"
	"strings"
)

// statusPage is the technician's page: one file with its style and script
// inline, so it works offline and from a phone on the gateway's network.
//
//go:embed page/index.html
var statusPage []byte

// pageCSP allows exactly the page's own inline style and script (by hash)
// and requests to the gateway itself, nothing else.
var pageCSP = func() string {
	hashes := func(tag string) string {
		re := regexp.MustCompile(`(?s)<` + tag + `>(.*?)</` + tag + `>`)
		var out []string
		for _, m := range re.FindAllSubmatch(statusPage, -1) {
			sum := sha256.Sum256(m[1])
			out = append(out, "'sha256-"+base64.StdEncoding.EncodeToString(sum[:])+"'")
		}
		return strings.Join(out, " ")
	}
	return "default-src 'none'; connect-src 'self'; img-src 'self' data:; style-src " + hashes("style") +
		"; script-src " + hashes("script") + "; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
}()

func servePage(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", pageCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-cache")
	_, _ = w.Write(statusPage)
}
