// Package nodeagent is the node's half of the controller↔node protocol of a
// cluster (DESIGN.md §3), chiefly where storage roots are local to each node.
//
// Only the node that holds a volume's storage root can create, grow,
// snapshot or delete it, and the controller reaches nodes only through the
// Kubernetes API. So the controller writes a PloopVolume or PloopSnapshot
// named by the id it chose, with spec.nodeName (and the NodeLabel) set to
// the owning node, and waits for its status. The reconcilers here, one set
// per node plugin watching only the resources labelled with its node, carry
// the spec out through the storage root's catalogue (which goes through the
// node's attachments when the volume is attached, so a snapshot or an
// expansion of a volume in use happens online) and report the outcome in
// the status: Ready with the result, or Failed with the catalogue's error
// class and message, for the generation they acted on. A permanent failure
// (invalid, out of range, no capacity) is reported once and not retried
// until the spec changes; others are retried with back-off. The Finalizer
// keeps a resource until its image or directory is gone from the root, so
// deleting the resource is how the controller deletes the volume.
//
// On a shared root the controller owns the catalogue, and a node's part is
// smaller (shared.go): it records on a volume's resource that it serves the
// volume (Reporter, as the volume is staged and unstaged) and carries out
// the online operations the controller writes into the resource of a
// volume it serves (SetupShared).
package nodeagent
