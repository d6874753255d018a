// Package buffer keeps readings durably on local flash until the uplink has
// acknowledged them. It knows nothing of MQTT, CoAP or Postgres.
//
// A Buffer is one bbolt file with one stream per priority class. Every
// appended reading gets the next sequence number of its class's stream, and
// a stream is uploaded strictly in sequence order, so one acknowledged
// sequence number marks a prefix. A new file (or a file moved aside as
// damaged) starts new random stream ids, so old sequence numbers never
// collide with new ones.
//
// Append is a group commit: concurrent callers (and all the appends that
// arrive within CommitInterval of the previous commit) share one write
// transaction and one fsync, and each returns only once its readings are
// durable. A message may carry an idempotency key, stored in the same
// transaction, so that a redelivery after a crash is recognised.
//
// # Caveats
//
//   - One process: bbolt holds an exclusive lock on the file, so a second
//     Open (the buffer CLI beside a running daemon) fails with ErrLocked.
//   - Peek copies records out and ends its read transaction before returning:
//     pages freed by Ack are reused only once no older reader holds them.
//   - Every commit costs an fsync. On flash, CommitInterval trades latency
//     for wear.
//   - The file never shrinks; MaxBytes bounds it and the data budget inside
//     it is lowered if bbolt reports the bound reached.
//   - A torn file can panic bbolt or fault in its memory map. Open recovers
//     from both by moving the file aside; a fault while running marks the file
//     so that the next Open does.
package buffer
