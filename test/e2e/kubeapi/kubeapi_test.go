package kubeapi

import (
	"context"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// TestServer proves what later tests rely on: the server is the pinned
// release, listens on loopback only, authenticates the identities Config,
// ConfigFor and service-account tokens carry, authorizes them by RBAC, and
// is gone after Stop.
func TestServer(t *testing.T) {
	s := StartT(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	u, err := url.Parse(s.URL)
	if err != nil || u.Scheme != "https" || u.Hostname() != "127.0.0.1" {
		t.Fatalf("server URL %q, want https on 127.0.0.1", s.URL)
	}
	admin := clientset(t, s.Config())
	v, err := admin.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v.GitVersion != KubernetesVersion || v.Major != "1" || v.Minor != strings.Split(KubernetesVersion, ".")[1] {
		t.Errorf("server version %+v, want %s (the build's -ldflags)", v, KubernetesVersion)
	}
	if user, groups := whoAmI(ctx, t, admin); user != AdminUser || !slices.Contains(groups, "system:masters") {
		t.Errorf("Config authenticates as %q %v", user, groups)
	}

	t.Run("RBAC", func(t *testing.T) {
		cfg, err := s.ConfigFor("alice", "ploop-testers")
		if err != nil {
			t.Fatal(err)
		}
		alice := clientset(t, cfg)
		if user, groups := whoAmI(ctx, t, alice); user != "alice" || !slices.Contains(groups, "ploop-testers") {
			t.Errorf("ConfigFor authenticates as %q %v", user, groups)
		}
		if _, err := alice.CoreV1().Pods("default").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Fatalf("alice listed pods before any binding: %v", err)
		}
		// Our own role: the built-in view, edit and admin roles are
		// aggregated, and the controller that fills them in runs in
		// kube-controller-manager, which this harness does not start.
		_, err = admin.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: "pod-reader"},
			Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		_, err = admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "ploop-testers-pod-reader"},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "pod-reader"},
			Subjects:   []rbacv1.Subject{{Kind: rbacv1.GroupKind, APIGroup: rbacv1.GroupName, Name: "ploop-testers"}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// The authorizer reads bindings from an informer: a new one takes
		// effect a moment after it is stored.
		eventually(ctx, t, "the binding to let alice list pods", func() error {
			_, err := alice.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
			return err
		})
		if _, err := alice.CoreV1().ConfigMaps("default").Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: "x"}}, metav1.CreateOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("pod-reader let alice create a config map: %v", err)
		}
	})

	t.Run("ServiceAccountToken", func(t *testing.T) {
		// No controller-manager runs, so no namespace has a default
		// service account until a test makes one.
		if _, err := admin.CoreV1().ServiceAccounts("default").Create(ctx, &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Name: "node-plugin"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		tr, err := admin.CoreV1().ServiceAccounts("default").CreateToken(ctx, "node-plugin",
			&authenticationv1.TokenRequest{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("token request (signing key): %v", err)
		}
		cfg := rest.AnonymousClientConfig(s.Config())
		cfg.BearerToken = tr.Status.Token
		if user, _ := whoAmI(ctx, t, clientset(t, cfg)); user != "system:serviceaccount:default:node-plugin" {
			t.Errorf("the token authenticates as %q", user)
		}
	})

	t.Run("Stop", func(t *testing.T) {
		s.Stop()
		if _, err := os.Stat(s.dir); !os.IsNotExist(err) {
			t.Errorf("state dir %s after Stop: %v", s.dir, err)
		}
		if c, err := net.DialTimeout("tcp", u.Host, time.Second); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after Stop", u.Host)
		}
		s.Stop() // and again, as t.Cleanup will
	})
}

func clientset(t *testing.T, cfg *rest.Config) *kubernetes.Clientset {
	t.Helper()
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func whoAmI(ctx context.Context, t *testing.T, cs *kubernetes.Clientset) (string, []string) {
	t.Helper()
	r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Status.UserInfo.Username, r.Status.UserInfo.Groups
}

// eventually retries f every 50 ms until it succeeds, failing t with its
// last error when ctx ends.
func eventually(ctx context.Context, t *testing.T, what string, f func() error) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		err := f()
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, err)
		case <-tick.C:
		}
	}
}

// TestBuildModule checks the build recipe against a go.mod shaped like
// k8s.io/kubernetes's: every ./staging replacement, and nothing else,
// becomes a published release of the matching version.
func TestBuildModule(t *testing.T) {
	gomod := []byte(`module k8s.io/kubernetes

go 1.24.0

require (
	k8s.io/api v0.0.0
	github.com/spf13/cobra v1.9.1
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/apimachinery => ./staging/src/k8s.io/apimachinery
	example.com/fork => example.com/fork v1.2.3
)
`)
	mods, err := stagingModules(gomod)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"k8s.io/api", "k8s.io/apimachinery"}; !slices.Equal(mods, want) {
		t.Fatalf("staging modules %v, want %v", mods, want)
	}
	src, err := buildModule("v1.34.4", mods)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"require k8s.io/kubernetes v1.34.4\n",
		"\tk8s.io/api => k8s.io/api v0.34.4\n", "\tk8s.io/apimachinery => k8s.io/apimachinery v0.34.4\n"} {
		if !strings.Contains(string(src), want) {
			t.Errorf("build go.mod lacks %q:\n%s", want, src)
		}
	}
	if strings.Contains(string(src), "fork") {
		t.Errorf("build go.mod replaces a non-staging module:\n%s", src)
	}
	if _, err := stagingModules([]byte("module k8s.io/kubernetes\n")); err == nil {
		t.Error("a go.mod without staging replacements was accepted")
	}
	if _, err := stagingVersion("v2.0.0"); err == nil {
		t.Error("stagingVersion accepted v2.0.0")
	}
	flags := versionLDFlags("v1.34.4")
	for _, want := range []string{"k8s.io/component-base/version.gitVersion=v1.34.4",
		"k8s.io/client-go/pkg/version.gitMinor=34", "k8s.io/component-base/version.gitMajor=1"} {
		if !strings.Contains(flags, want) {
			t.Errorf("ldflags %q lack %s", flags, want)
		}
	}
}

// TestStartFailure checks that a server that cannot start says why: the
// error carries the end of kube-apiserver's log, and nothing is left behind.
func TestStartFailure(t *testing.T) {
	if why := SkipReason(); why != "" {
		t.Skip(why)
	}
	scratchDir = t.TempDir()
	defer func() { scratchDir = "" }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, err := Start(ctx, Options{Args: []string{"--no-such-flag"}, Logf: t.Logf})
	if err == nil {
		s.Stop()
		t.Fatal("kube-apiserver started with an unknown flag")
	}
	if !strings.Contains(err.Error(), "exited before it was ready") || !strings.Contains(err.Error(), "no-such-flag") {
		t.Errorf("error does not show why kube-apiserver stopped: %v", err)
	}
	t.Log(err)
	if left, _ := os.ReadDir(scratchDir); len(left) != 0 {
		t.Errorf("a failed start left %s in its scratch dir", left[0].Name())
	}
}
