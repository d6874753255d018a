// Command sluice is the Sluice edge gateway: it takes sensor readings in over
// MQTT and CoAP, keeps them on local flash and uploads them to Postgres
// exactly once. It is also the technician's and the operator's tool.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"

	"github.com/alecthomas/kong"
)

// version is stamped at build time (-ldflags "-X main.version=...").
var version = "dev"

// Exit statuses of the contract.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// usageError is bad usage or a bad config: exit status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

type cli struct {
	Run       runCmd       `cmd:"" help:"Run the gateway."`
	Status    statusCmd    `cmd:"" help:"Ask a running gateway how it is."`
	Doctor    doctorCmd    `cmd:"" help:"Check a gateway's config, disk, clock, broker, database and ports, with the fix for each failure."`
	Fleet     fleetCmd     `cmd:"" help:"The central view: every gateway's uplink health, worst first."`
	Migrate   migrateCmd   `cmd:"" help:"Apply the central schema (with the schema owner's role)."`
	Buffer    bufferCmd    `cmd:"" help:"Inspect, export or import the local buffer (daemon stopped)."`
	Profile   profileCmd   `cmd:"" help:"List or show the firmware profiles."`
	Provision provisionCmd `cmd:"" help:"Write and check a new gateway's config (with --out, a bundle to copy onto it)."`
	Simulate  simulateCmd  `cmd:"" help:"Send realistic grid and water sensor readings over MQTT or CoAP (an end-to-end check, a load generator)."`
	Config    configCmd    `cmd:"" help:"Show the effective config."`
	Version   versionCmd   `cmd:"" help:"Print the version."`
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	var c cli
	exit := -1
	parser, err := kong.New(&c,
		kong.Name("sluice"),
		kong.Description("Sluice edge gateway: sensor readings in over MQTT and CoAP, to Postgres exactly once."),
		kong.UsageOnError(),
		kong.Exit(func(code int) { exit = code }),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sluice:", err)
		return exitFailure
	}
	ctx, err := parser.Parse(args)
	if exit >= 0 { // --help
		return exit
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sluice:", err)
		return exitUsage
	}
	err = ctx.Run()
	var ue usageError
	var ce *ConfigError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ce):
		fmt.Fprint(os.Stderr, errorLines(ce.Problems))
		return exitUsage
	case errors.As(err, &ue):
		fmt.Fprintln(os.Stderr, "sluice:", ue.err)
		return exitUsage
	default:
		fmt.Fprintln(os.Stderr, "sluice:", err)
		return exitFailure
	}
}

type versionCmd struct{}

func (versionCmd) Run() error {
	fmt.Println("sluice", version)
	if bi, ok := debug.ReadBuildInfo(); ok {
		fmt.Println(bi.GoVersion)
	}
	return nil
}
