package kubeapi

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"
)

// InstallCRDs creates the CustomResourceDefinitions in the YAML files
// matching glob and returns once each is Established and its kind is in
// discovery, from which clients' REST mappers learn it. (The server still
// holds a create that comes within 2 s of its CRD becoming Established,
// for HA servers that have not seen the CRD yet.)
func (s *Server) InstallCRDs(ctx context.Context, glob string) error {
	files, err := filepath.Glob(glob)
	if err != nil || len(files) == 0 {
		return fmt.Errorf("install CRDs: nothing matches %s (%v)", glob, err)
	}
	scheme := runtime.NewScheme()
	if err := apiextensionsv1.AddToScheme(scheme); err != nil {
		return err
	}
	c, err := client.New(s.Config(), client.Options{Scheme: scheme})
	if err != nil {
		return fmt.Errorf("install CRDs: %w", err)
	}
	var crds []apiextensionsv1.CustomResourceDefinition
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		var crd apiextensionsv1.CustomResourceDefinition
		if err := yaml.UnmarshalStrict(b, &crd); err != nil {
			return fmt.Errorf("install CRDs: %s: %w", f, err)
		}
		if err := c.Create(ctx, &crd); err != nil {
			return fmt.Errorf("install CRDs: create %s: %w", crd.Name, err)
		}
		crds = append(crds, crd)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(s.Config())
	if err != nil {
		return err
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if crdsServed(ctx, c, dc, crds) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("install CRDs: not established and discoverable: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

func crdsServed(ctx context.Context, c client.Client, dc discovery.DiscoveryInterface, crds []apiextensionsv1.CustomResourceDefinition) bool {
	for _, want := range crds {
		var crd apiextensionsv1.CustomResourceDefinition
		if err := c.Get(ctx, client.ObjectKey{Name: want.Name}, &crd); err != nil {
			return false
		}
		established := false
		for _, cond := range crd.Status.Conditions {
			if cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue {
				established = true
			}
		}
		if !established {
			return false
		}
		for _, v := range crd.Spec.Versions {
			if !v.Served {
				continue
			}
			list, err := dc.ServerResourcesForGroupVersion(crd.Spec.Group + "/" + v.Name)
			if err != nil {
				return false
			}
			found := false
			for _, r := range list.APIResources {
				found = found || r.Kind == crd.Spec.Names.Kind
			}
			if !found {
				return false
			}
		}
	}
	return true
}

// Client is a controller-runtime client of the server as its admin, with a
// scheme of client-go's built-in kinds plus whatever adds registers (a
// project's API types), which it also returns.
func (s *Server) Client(adds ...func(*runtime.Scheme) error) (client.Client, *runtime.Scheme, error) {
	scheme := runtime.NewScheme()
	for _, add := range append([]func(*runtime.Scheme) error{clientgoscheme.AddToScheme}, adds...) {
		if err := add(scheme); err != nil {
			return nil, nil, err
		}
	}
	c, err := client.New(s.Config(), client.Options{Scheme: scheme})
	if err != nil {
		return nil, nil, fmt.Errorf("client of %s: %w", s.Config().Host, err)
	}
	return c, scheme, nil
}

// WriteKubeconfig writes a kubeconfig with the admin's credentials to path,
// for programs the tests run against the server (ploop-csi, helm).
func (s *Server) WriteKubeconfig(path string) error {
	return writeKubeconfig(path, s.Config(), "")
}

// WriteKubeconfigFor writes a kubeconfig that authenticates as user in
// groups (as ConfigFor) to path; server, when set, replaces the server's
// URL (its address through a forward, such as a VM's).
func (s *Server) WriteKubeconfigFor(path, server, user string, groups ...string) error {
	rc, err := s.ConfigFor(user, groups...)
	if err != nil {
		return err
	}
	return writeKubeconfig(path, rc, server)
}

// CACertPEM is the certificate of the CA that signs the serving and client
// certificates.
func (s *Server) CACertPEM() []byte { return bytes.Clone(s.ca.certPEM) }

// Dir is the server's state directory: certificates, the service-account
// key (sa.key) and the logs, removed by Stop.
func (s *Server) Dir() string { return s.dir }

func writeKubeconfig(path string, rc *rest.Config, server string) error {
	if server == "" {
		server = rc.Host
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["test"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: rc.CAData}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: rc.CertData, ClientKeyData: rc.KeyData}
	kc.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "admin"}
	kc.CurrentContext = "test"
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}
