//go:build race

package main

// raceEnabled builds the gateway under test with the race detector too.
const raceEnabled = true
