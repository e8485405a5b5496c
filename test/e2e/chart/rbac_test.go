package chart

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// A grant is one right of one ServiceAccount: verb on group/resource, in
// the whole cluster ("*") or in one namespace.
type grant struct {
	sa, scope, group, resource, verb string
}

func (g grant) String() string {
	group := g.group
	if group == "" {
		group = "core"
	}
	return fmt.Sprintf("%s: %s %s/%s in %s", g.sa, g.verb, group, g.resource, g.scope)
}

// rule is a row of the expected tables: verbs (space-separated) on each
// of resources (space-separated).
type rule struct {
	scope, group, resources, verbs string
}

const cluster = "*"

// The rights each ServiceAccount must have, and no others. A right added
// to the chart fails TestRBAC until it is reviewed and written here.
var (
	controllerRules = []rule{
		{cluster, "", "persistentvolumes", "get list watch create patch delete"},
		{cluster, "", "persistentvolumeclaims", "get list watch update"},
		{cluster, "", "persistentvolumeclaims/status", "patch"},
		{cluster, "", "nodes", "get list watch"},
		{cluster, "", "events", "list watch create update patch"},
		{cluster, "storage.k8s.io", "storageclasses csinodes", "get list watch"},
		{cluster, "storage.k8s.io", "volumeattributesclasses", "get list watch"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshots", "get list"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshotcontents", "get list watch update patch"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshotcontents/status", "update patch"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshotclasses", "get list watch"},
		{cluster, "ploop.io", "ploopvolumes ploopsnapshots", "get list watch create update patch delete"},
		{namespace, "coordination.k8s.io", "leases", "get list watch create update delete"},
	}
	// Only with storage capacity tracking, i.e. in local mode.
	capacityRules = []rule{
		{namespace, "storage.k8s.io", "csistoragecapacities", "get list watch create update patch delete"},
		{namespace, "", "pods", "get"},
		{namespace, "apps", "replicasets", "get"},
	}
	// Only in shared mode, where the controller reports volumes ready.
	sharedRules = []rule{
		{cluster, "ploop.io", "ploopvolumes/status ploopsnapshots/status", "patch"},
	}
	nodeRules = []rule{
		{cluster, "ploop.io", "ploopvolumes ploopsnapshots", "get list watch update patch"},
		{cluster, "ploop.io", "ploopvolumes/status ploopsnapshots/status", "update patch"},
		{cluster, "", "nodes", "patch"},
		{cluster, "", "events", "create patch"},
	}
	snapshotControllerRules = []rule{
		{cluster, "", "persistentvolumes", "get list watch"},
		{cluster, "", "persistentvolumeclaims", "get list watch update"},
		{cluster, "", "events", "list watch create update patch"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshotclasses", "get list watch"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshotcontents", "get list watch create update patch delete"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshotcontents/status", "patch"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshots", "get list watch update patch delete"},
		{cluster, "snapshot.storage.k8s.io", "volumesnapshots/status", "update patch"},
		{namespace, "coordination.k8s.io", "leases", "get list watch create update delete"},
	}
)

func expand(sa string, rules ...[]rule) map[grant]bool {
	m := map[grant]bool{}
	for _, rs := range rules {
		for _, r := range rs {
			for _, res := range strings.Fields(r.resources) {
				for _, v := range strings.Fields(r.verbs) {
					m[grant{sa, r.scope, r.group, res, v}] = true
				}
			}
		}
	}
	return m
}

func TestRBAC(t *testing.T) {
	const (
		ctrl = namespace + "/ploop-csi-controller"
		node = namespace + "/ploop-csi-node"
		snap = namespace + "/ploop-csi-snapshot-controller"
	)
	cases := []struct {
		combo string
		want  []map[grant]bool
	}{
		{"default", []map[grant]bool{expand(ctrl, controllerRules, capacityRules), expand(node, nodeRules)}},
		{"shared", []map[grant]bool{expand(ctrl, controllerRules, sharedRules), expand(node, nodeRules)}},
		{"snapshot-controller", []map[grant]bool{expand(ctrl, controllerRules, capacityRules), expand(node, nodeRules),
			expand(snap, snapshotControllerRules)}},
	}
	for _, c := range cases {
		t.Run(c.combo, func(t *testing.T) {
			i := slices.IndexFunc(combos, func(x combo) bool { return x.name == c.combo })
			objs := render(t, helmbin3, combos[i])
			got, err := grants(t, objs)
			if err != nil {
				t.Fatal(err)
			}
			want := map[grant]bool{}
			for _, w := range c.want {
				for g := range w {
					want[g] = true
				}
			}
			var extra, missing []string
			for g := range got {
				if !want[g] {
					extra = append(extra, g.String())
				}
			}
			for g := range want {
				if !got[g] {
					missing = append(missing, g.String())
				}
			}
			sort.Strings(extra)
			sort.Strings(missing)
			if len(extra) > 0 {
				t.Errorf("rights granted beyond the reviewed table (review each, then add it to rbac_test.go):\n  %s", strings.Join(extra, "\n  "))
			}
			if len(missing) > 0 {
				t.Errorf("rights in the table the chart does not grant:\n  %s", strings.Join(missing, "\n  "))
			}
			// Every ServiceAccount the workloads run as is one whose
			// rights were just checked (or has none).
			sas := map[string]bool{}
			for g := range got {
				sas[g.sa] = true
			}
			for _, u := range objs {
				if spec := podSpec(t, u); spec != nil {
					sa := namespace + "/" + spec.ServiceAccountName
					if spec.ServiceAccountName == "" || !sas[sa] {
						t.Errorf("%s %s runs as %q, which the table does not cover", u.GetKind(), u.GetName(), spec.ServiceAccountName)
					}
					if spec.AutomountServiceAccountToken != nil && !*spec.AutomountServiceAccountToken {
						t.Errorf("%s %s cannot use its service account", u.GetKind(), u.GetName())
					}
				}
			}
		})
	}
}

// grants lists every right the rendered bindings give to ServiceAccounts.
// Wildcards, resource names and non-resource URLs are refused outright: the
// chart needs none, and each would hide rights from the table.
func grants(t *testing.T, objs []*unstructured.Unstructured) (map[grant]bool, error) {
	roles := map[string][]rbacv1.PolicyRule{} // kind/namespace/name
	for _, u := range ofKind(objs, "ClusterRole") {
		cr := as[rbacv1.ClusterRole](t, u)
		if cr.AggregationRule != nil {
			return nil, fmt.Errorf("ClusterRole %s aggregates other roles", cr.Name)
		}
		roles["ClusterRole//"+cr.Name] = cr.Rules
	}
	for _, u := range ofKind(objs, "Role") {
		r := as[rbacv1.Role](t, u)
		roles["Role/"+r.Namespace+"/"+r.Name] = r.Rules
	}
	type binding struct {
		scope    string
		roleRef  rbacv1.RoleRef
		subjects []rbacv1.Subject
		name     string
	}
	var bindings []binding
	for _, u := range ofKind(objs, "ClusterRoleBinding") {
		b := as[rbacv1.ClusterRoleBinding](t, u)
		bindings = append(bindings, binding{cluster, b.RoleRef, b.Subjects, "ClusterRoleBinding " + b.Name})
	}
	for _, u := range ofKind(objs, "RoleBinding") {
		b := as[rbacv1.RoleBinding](t, u)
		bindings = append(bindings, binding{b.Namespace, b.RoleRef, b.Subjects, "RoleBinding " + b.Name})
	}
	got := map[grant]bool{}
	for _, b := range bindings {
		key := b.roleRef.Kind + "//" + b.roleRef.Name
		if b.roleRef.Kind == "Role" {
			key = "Role/" + b.scope + "/" + b.roleRef.Name
		}
		rules, ok := roles[key]
		if !ok {
			return nil, fmt.Errorf("%s refers to %s %s, which the chart does not render", b.name, b.roleRef.Kind, b.roleRef.Name)
		}
		for _, s := range b.subjects {
			if s.Kind != rbacv1.ServiceAccountKind {
				return nil, fmt.Errorf("%s binds %s %s, not a ServiceAccount", b.name, s.Kind, s.Name)
			}
			if s.Namespace != namespace {
				return nil, fmt.Errorf("%s binds a ServiceAccount of namespace %q, not the release's", b.name, s.Namespace)
			}
			for _, r := range rules {
				if len(r.NonResourceURLs) > 0 || len(r.ResourceNames) > 0 {
					return nil, fmt.Errorf("%s: a rule with non-resource URLs or resource names: %+v", b.name, r)
				}
				for _, g := range r.APIGroups {
					for _, res := range r.Resources {
						for _, v := range r.Verbs {
							if g == "*" || res == "*" || v == "*" {
								return nil, fmt.Errorf("%s: a wildcard rule: %+v", b.name, r)
							}
							got[grant{s.Namespace + "/" + s.Name, b.scope, g, res, v}] = true
						}
					}
				}
			}
		}
	}
	return got, nil
}
