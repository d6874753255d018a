package buffer

import (
	"errors"
	"fmt"
)

// Errors returned by Append.
var (
	// ErrFull is returned when the readings do not fit and the overflow
	// policy is "reject". Nothing of the message was stored.
	ErrFull = errors.New("buffer full")
	// ErrClosed is returned by every call after Close has begun.
	ErrClosed = errors.New("buffer closed")
	// ErrTooLarge is returned for a message larger than the whole buffer may hold.
	ErrTooLarge = errors.New("message larger than the buffer")
)

// Errors returned by Open.
var (
	// ErrLocked is returned when another process holds the buffer file open,
	// usually the running daemon.
	ErrLocked = errors.New("buffer file is locked by another process (stop the sluice daemon first)")
)

// Errors returned at any time.
var (
	// ErrDamaged is returned once the file has shown damage while open. The file
	// is marked so that the next Open moves it aside.
	ErrDamaged = errors.New("buffer file damaged")
)

// CorruptionError tells which file was damaged, where it was moved and why.
type CorruptionError struct {
	Path    string // the damaged file's original path
	MovedTo string // where it was moved aside ("" when it could not be moved)
	Err     error
}

func (e *CorruptionError) Error() string {
	return fmt.Sprintf("buffer file %s damaged (moved to %s): %v", e.Path, e.MovedTo, e.Err)
}

func (e *CorruptionError) Unwrap() error { return e.Err }
