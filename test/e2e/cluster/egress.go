package cluster

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// kubeletProxy is the API server's only way to the node: its egress
// selector for the cluster sends every connection to a node, pod or
// service as an HTTP CONNECT to this proxy's unix socket. The proxy
// relays a connection to the node's kubelet address (the guest's, which
// the host has no route to) to the VM's forward on the host's 127.0.0.1,
// and refuses every other address, which it records. So logs, exec and a
// node's metrics work while no traffic leaves the host's loopback.
type kubeletProxy struct {
	ln      net.Listener
	kubelet string // host:port the API server asks for
	forward string // 127.0.0.1:port of the VM's host forward

	mu      sync.Mutex
	refused []string
}

// KubeletPort is the kubelet's port in the guest.
const KubeletPort = 10250

// startKubeletProxy listens on socket and relays the guest's kubelet
// address to 127.0.0.1:forwardPort.
func startKubeletProxy(socket string, forwardPort int) (*kubeletProxy, error) {
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return nil, fmt.Errorf("kubelet proxy: %w", err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("kubelet proxy: %w", err)
	}
	p := &kubeletProxy{ln: ln, kubelet: net.JoinHostPort(vmtest.GuestIP, strconv.Itoa(KubeletPort)),
		forward: net.JoinHostPort("127.0.0.1", strconv.Itoa(forwardPort))}
	go p.serve()
	return p, nil
}

func (p *kubeletProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.relay(c)
	}
}

func (p *kubeletProxy) relay(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	if req.Method != http.MethodConnect || req.Host != p.kubelet {
		p.mu.Lock()
		p.refused = append(p.refused, req.Method+" "+req.Host)
		p.mu.Unlock()
		fmt.Fprintf(c, "HTTP/1.1 403 Forbidden\r\n\r\nonly the node's kubelet (%s) is reachable\n", p.kubelet)
		return
	}
	up, err := net.Dial("tcp", p.forward)
	if err != nil {
		fmt.Fprintf(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n%v\n", err)
		return
	}
	defer up.Close()
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		return
	}
	// Either side's end ends the relay (TLS needs no half-close).
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, br); done <- struct{}{} }()
	go func() { io.Copy(c, up); done <- struct{}{} }()
	<-done
}

// Refused lists the addresses the API server asked for and did not get.
func (p *kubeletProxy) Refused() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.refused...)
}

func (p *kubeletProxy) Close() error { return p.ln.Close() }

// egressConfig is the API server's egress selector configuration: the
// cluster's traffic through the proxy at socket.
func egressConfig(socket string) string {
	return fmt.Sprintf(`apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: %q
`, socket)
}
