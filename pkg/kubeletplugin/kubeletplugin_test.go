package kubeletplugin

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// TestRegistration plays the kubelet's plugin watcher against a served
// registration socket: the info it gets, and the status it reports.
func TestRegistration(t *testing.T) {
	for _, tt := range []struct{ driver, endpoint string }{
		{"", "/var/lib/kubelet/plugins/x/csi.sock"},
		{"csi.ploop.io", "relative/csi.sock"},
		{"csi.ploop.io", "/a/../csi.sock"},
	} {
		if _, err := New(tt.driver, tt.endpoint, logr.Discard()); err == nil {
			t.Errorf("New(%q, %q) accepted", tt.driver, tt.endpoint)
		}
	}
	const endpoint = "/var/lib/kubelet/plugins/csi.ploop.io/csi.sock"
	r, err := New("csi.ploop.io", endpoint, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	sock := SocketPath(t.TempDir(), "csi.ploop.io")
	if !strings.HasSuffix(sock, "/csi.ploop.io-reg.sock") {
		t.Errorf("socket %s", sock)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- r.Serve(sctx, lis) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kubelet := registerapi.NewRegistrationClient(conn)
	info, err := kubelet.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetType() != registerapi.CSIPlugin || info.GetName() != "csi.ploop.io" || info.GetEndpoint() != endpoint ||
		len(info.GetSupportedVersions()) == 0 {
		t.Errorf("info %v", info)
	}
	if r.Registered() == nil {
		t.Error("registered before the kubelet said so")
	}
	for _, tt := range []struct {
		st      *registerapi.RegistrationStatus
		wantErr string
	}{
		{&registerapi.RegistrationStatus{PluginRegistered: false, Error: "NodeGetInfo failed"}, "NodeGetInfo failed"},
		{&registerapi.RegistrationStatus{PluginRegistered: true}, ""},
	} {
		if _, err := kubelet.NotifyRegistrationStatus(ctx, tt.st); err != nil {
			t.Fatal(err)
		}
		err := r.Registered()
		if (err == nil) != (tt.wantErr == "") || err != nil && !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("after %v: Registered() = %v, want %q", tt.st, err, tt.wantErr)
		}
	}
	stop()
	if err := <-served; err != nil {
		t.Errorf("serve: %v", err)
	}
}
