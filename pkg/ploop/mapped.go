package ploop

import (
	"os"
	"slices"
)

// Mapped I/O lets a server with an io_uring of its own (the ublk queue)
// read and write a request's bytes in a delta's file itself, on the ring
// that delivered the request, instead of handing each request to a thread
// that calls ReadAt or WriteAt. The stack says where the bytes are and
// holds that mapping still until the server calls done: the chain (the I/O
// lock shared, as ReadAt holds it), the grace epoch (so that no file range
// the request may use is reused), and for writes the clusters' stripe
// locks, as Image.WriteAt holds them. It answers only when the whole
// request is one file range or reads as zeros, when that range is already
// allocated for a write (no copy-up, no BAT change), and when it can do so
// without waiting: a server calls it on the thread that must also reap the
// completions that release what it holds. Otherwise ok is false and the
// server calls ReadAt or WriteAt, which take the slow way and report
// errors. A write done this way is as durable as one by WriteAt: Flush
// covers it.

// MapRead returns where the stack holds p's bytes at off: f at fileOff, or
// zeros when f is nil. On ok the caller reads into p and then calls done.
func (s *Stack) MapRead(p []byte, off int64) (f *os.File, fileOff int64, done func(), ok bool) {
	if !s.io.TryRLock() {
		return nil, 0, nil, false
	}
	epoch := s.inflight.enter()
	done = func() { s.end(epoch) }
	n := int64(len(p))
	if s.closed || checkRange("read", off, n, s.Size()) != nil {
		done()
		return nil, 0, nil, false
	}
	for i := len(s.layers) - 1; i >= 0; i-- {
		l := s.layers[i]
		if end := l.Size(); off+n > end {
			if off >= end {
				// Frozen before a grow: nothing here or below.
				return nil, 0, done, true
			}
			done()
			return nil, 0, nil, false
		}
		f, fileOff, found, whole := mapDisk(l, p, off)
		switch {
		case !whole || found && f == nil:
			done()
			return nil, 0, nil, false
		case found:
			return f, fileOff, done, true
		}
	}
	// No delta has any of it.
	return nil, 0, done, true
}

// mapDisk maps [off, off+len(p)) in one delta: found with the file range
// when all of it is allocated in one run (f nil when the storage will not
// have the caller do its I/O), not found when none of it is, whole false
// when it is split.
func mapDisk(d Disk, p []byte, off int64) (f *os.File, fileOff int64, found, whole bool) {
	switch d := d.(type) {
	case *Raw:
		if d.closed.Load() {
			return nil, 0, true, true
		}
		return d.s.ioFile(p, off), off, true, true
	case *Image:
		if d.closed.Load() {
			return nil, 0, true, true
		}
		host, n := d.run(off, len(p))
		if n < len(p) {
			return nil, 0, false, false
		}
		if host == 0 {
			return nil, 0, false, true
		}
		return d.s.ioFile(p, host), host, true, true
	}
	return nil, 0, false, false
}

// MapWrite returns where the stack's top delta holds p's bytes at off, when
// they are allocated there in one run. On ok the caller writes p to f at
// fileOff and then calls done.
func (s *Stack) MapWrite(p []byte, off int64) (f *os.File, fileOff int64, done func(), ok bool) {
	if s.readOnly || !s.io.TryRLock() {
		return nil, 0, nil, false
	}
	epoch := s.inflight.enter()
	end := func() { s.end(epoch) }
	if s.closed || checkRange("write", off, int64(len(p)), s.Size()) != nil {
		end()
		return nil, 0, nil, false
	}
	switch top := s.top().(type) {
	case *Raw:
		if len(s.layers) == 1 && !top.readOnly && !top.closed.Load() {
			if f := top.s.ioFile(p, off); f != nil {
				return f, off, end, true
			}
		}
	case *Image:
		if f, fileOff, release, ok := top.mapWrite(p, off); ok {
			return f, fileOff, func() { release(); end() }, true
		}
	}
	end()
	return nil, 0, nil, false
}

// mapWrite holds the stripe locks of the clusters p covers shared, as
// writeCluster does, when all of them are allocated in one run.
func (img *Image) mapWrite(p []byte, off int64) (*os.File, int64, func(), bool) {
	if img.readOnly || img.closed.Load() || len(p) == 0 {
		return nil, 0, nil, false
	}
	first, last := off/img.cs, (off+int64(len(p))-1)/img.cs
	stripes := make([]int64, 0, last-first+1)
	for i := first; i <= last; i++ {
		stripes = append(stripes, i%clusterLockStripes)
	}
	slices.Sort(stripes)
	stripes = slices.Compact(stripes)
	for k, st := range stripes {
		if !img.clusterLocks[st].TryRLock() {
			for _, held := range stripes[:k] {
				img.clusterLocks[held].RUnlock()
			}
			return nil, 0, nil, false
		}
	}
	unlock := func() {
		for _, st := range stripes {
			img.clusterLocks[st].RUnlock()
		}
	}
	host, n := img.run(off, len(p))
	var f *os.File
	if host != 0 && n == len(p) {
		f = img.s.ioFile(p, host)
	}
	if f == nil {
		unlock()
		return nil, 0, nil, false
	}
	return f, host, func() {
		// A move that copied one of these clusters meanwhile must copy
		// it again (see moveTracker).
		for i := first; i <= last; i++ {
			img.moving.changed(i)
		}
		unlock()
	}, true
}

// MapRead places a read of a raw image: always its own file range, when
// the storage lets the caller do the I/O.
func (r *Raw) MapRead(p []byte, off int64) (*os.File, int64, func(), bool) {
	if r.closed.Load() || r.checkRead("read", off, int64(len(p))) != nil {
		return nil, 0, nil, false
	}
	return r.mapped(p, off)
}

// MapWrite places a write of a raw image, as MapRead a read.
func (r *Raw) MapWrite(p []byte, off int64) (*os.File, int64, func(), bool) {
	if r.closed.Load() || r.checkWrite("write", off, int64(len(p))) != nil {
		return nil, 0, nil, false
	}
	return r.mapped(p, off)
}

func (r *Raw) mapped(p []byte, off int64) (*os.File, int64, func(), bool) {
	f := r.s.ioFile(p, off)
	if f == nil {
		return nil, 0, nil, false
	}
	return f, off, func() {}, true
}

// MapRead places a read of an image served alone: as Stack.MapRead with
// one delta, holding nothing (ReadAt holds nothing either).
func (img *Image) MapRead(p []byte, off int64) (*os.File, int64, func(), bool) {
	if img.checkRead("read", off, int64(len(p))) != nil {
		return nil, 0, nil, false
	}
	f, fileOff, found, whole := mapDisk(img, p, off)
	switch {
	case !whole || found && f == nil:
		return nil, 0, nil, false
	case !found:
		return nil, 0, func() {}, true
	}
	return f, fileOff, func() {}, true
}

// MapWrite places a write of an image served alone, as Stack.MapWrite.
func (img *Image) MapWrite(p []byte, off int64) (*os.File, int64, func(), bool) {
	if img.checkWrite("write", off, int64(len(p))) != nil {
		return nil, 0, nil, false
	}
	return img.mapWrite(p, off)
}
