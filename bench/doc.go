// Package bench measures Sluice's speed and size against real Mosquitto and
// PostgreSQL: the load generator, the bare ceilings and the process probes
// that the load harness (bench/load) and the benchmarks share.
// It stays out of the gateway: nothing here is linked into the sluice binary.
//
// See bench/README.md for the commands and the figures they produced.
package bench
