// Package kubeletplugin registers the driver with the kubelet, as the
// upstream node-driver-registrar sidecar does, from inside the node
// plugin: the kubelet watches its plugin-registration directory
// (<kubelet dir>/plugins_registry), connects to each socket that appears
// there, asks it (GetInfo) for the plugin's type, name, CSI endpoint and
// versions, then calls the CSI endpoint's NodeGetInfo, writes the node's
// CSINode entry, and reports the outcome (NotifyRegistrationStatus). The
// socket is <dir>/<driver>-reg.sock, made 0600 by its caller; the kubelet
// connects as root. A failed registration is logged and kept for
// Registered: the kubelet retries when the socket reappears, so the
// plugin stays up rather than exiting as the sidecar does.
package kubeletplugin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// SupportedVersions are the CSI versions the driver tells the kubelet.
var SupportedVersions = []string{"1.0.0"}

// SocketPath is the registration socket of driver in dir.
func SocketPath(dir, driver string) string { return filepath.Join(dir, driver+"-reg.sock") }

// Registration answers the kubelet's plugin-watcher for one CSI driver.
type Registration struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint string
	log              logr.Logger

	mu         sync.Mutex
	registered bool
	lastErr    error
}

// New returns the Registration of driver, whose CSI socket the kubelet
// reaches at endpoint (a path on the node, e.g.
// /var/lib/kubelet/plugins/csi.ploop.io/csi.sock).
func New(driver, endpoint string, log logr.Logger) (*Registration, error) {
	if driver == "" || !filepath.IsAbs(endpoint) || filepath.Clean(endpoint) != endpoint {
		return nil, fmt.Errorf("kubelet registration: want a driver name and an absolute, clean endpoint path (got %q, %q)", driver, endpoint)
	}
	return &Registration{driver: driver, endpoint: endpoint, log: log}, nil
}

// GetInfo tells the kubelet what plugin this is.
func (r *Registration) GetInfo(ctx context.Context, _ *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	r.log.V(2).Info("the kubelet asks for the plugin's registration", "driver", r.driver, "endpoint", r.endpoint)
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: r.driver, Endpoint: r.endpoint,
		SupportedVersions: SupportedVersions}, nil
}

// NotifyRegistrationStatus records the kubelet's verdict.
func (r *Registration) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.registered = st.GetPluginRegistered()
	if r.registered {
		r.lastErr = nil
		r.log.Info("registered with the kubelet", "driver", r.driver)
	} else {
		r.lastErr = fmt.Errorf("the kubelet refused the registration of %s: %s", r.driver, st.GetError())
		r.log.Error(r.lastErr, "registration failed; the kubelet retries when the registration socket is made again")
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Registered reports nil once the kubelet has registered the driver, else
// why not.
func (r *Registration) Registered() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.registered:
		return nil
	case r.lastErr != nil:
		return r.lastErr
	}
	return errors.New("the kubelet has not registered the driver yet")
}

// Serve answers the kubelet on lis until ctx ends.
func (r *Registration) Serve(ctx context.Context, lis net.Listener) error {
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, r)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	select {
	case err := <-done:
		return fmt.Errorf("serve the kubelet registration on %s: %w", lis.Addr(), err)
	case <-ctx.Done():
		srv.Stop()
		<-done
		return nil
	}
}
