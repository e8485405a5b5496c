package clustercatalog

import (
	"context"
	"errors"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// TestAPIError: failing to reach the API server is Unavailable, except
// when it is the caller's deadline, ended or about to be (client-go's rate
// limiter refuses a request it could not send in time).
func TestAPIError(t *testing.T) {
	live := context.Background()
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	limiter := errors.New("client rate limiter Wait returned an error: rate: Wait(n=1) would exceed context deadline")
	for _, tt := range []struct {
		name     string
		ctx      context.Context
		err      error
		deadline bool
	}{
		{"server down", live, errors.New("connection refused"), false},
		{"rate limiter near the deadline", live, limiter, true},
		{"context ended", ended, errors.New("context canceled"), true},
	} {
		err := apiError(tt.ctx, "read volume x", tt.err)
		if got := errors.Is(err, context.DeadlineExceeded); got != tt.deadline {
			t.Errorf("%s: %v: deadline %t, want %t", tt.name, err, got, tt.deadline)
		}
		if got := errors.Is(err, catalog.ErrUnavailable); got == tt.deadline {
			t.Errorf("%s: %v: unavailable %t, want %t", tt.name, err, got, !tt.deadline)
		}
	}
}
