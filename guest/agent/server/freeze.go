package server

import (
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
)

func (s *Server) freeze(log *slog.Logger, fw *frameWriter, r *proto.Freeze) {
	if s.cfg.Freezer == nil {
		fw.fail(proto.CodeInvalid, "this agent cannot freeze filesystems")
		return
	}
	paths := r.Paths
	if len(paths) == 0 {
		paths = []string{"/"}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range paths {
		if slices.Contains(s.frozen, p) {
			fw.fail(proto.CodeBusy, "%s is already frozen", p)
			return
		}
	}
	var done []string
	for _, p := range paths {
		if err := s.cfg.Freezer.Freeze(p); err != nil {
			// All or nothing: undo what this request froze.
			for i := len(done) - 1; i >= 0; i-- {
				if terr := s.cfg.Freezer.Thaw(done[i]); terr != nil {
					log.Error("thaw after failed freeze", "path", done[i], "err", terr)
				}
			}
			fw.fail(errCode(err), "freeze %s: %v", p, err)
			return
		}
		done = append(done, p)
	}
	s.frozen = append(s.frozen, done...)
	if r.AutoThawNS > 0 {
		if s.autoThaw != nil {
			s.autoThaw.Stop()
		}
		d := time.Duration(r.AutoThawNS)
		s.autoThaw = time.AfterFunc(d, func() {
			log.Warn("no thaw arrived in time: thawing", "after", d)
			if err := s.thawAll(); err != nil {
				log.Error("auto-thaw", "err", err)
			}
		})
	}
	log.Info("frozen", "paths", done)
	fw.frame(proto.TOK, nil)
}

func (s *Server) thaw(log *slog.Logger, fw *frameWriter, r *proto.Thaw) {
	if s.cfg.Freezer == nil {
		fw.fail(proto.CodeInvalid, "this agent cannot thaw filesystems")
		return
	}
	var err error
	if len(r.Paths) == 0 {
		err = s.thawAll()
	} else {
		err = s.thawPaths(r.Paths)
	}
	if err != nil {
		fw.fail(errCode(err), "%v", err)
		return
	}
	log.Info("thawed", "paths", r.Paths)
	fw.frame(proto.TOK, nil)
}

// thawAll thaws everything frozen, newest first.
func (s *Server) thawAll() error {
	s.mu.Lock()
	paths := slices.Clone(s.frozen)
	s.mu.Unlock()
	return s.thawPaths(paths)
}

func (s *Server) thawPaths(paths []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range paths {
		if !slices.Contains(s.frozen, p) {
			return fmt.Errorf("thaw %s: not frozen by this agent", p)
		}
	}
	var firstErr error
	for i := len(paths) - 1; i >= 0; i-- {
		p := paths[i]
		if err := s.cfg.Freezer.Thaw(p); err != nil && firstErr == nil {
			firstErr = fmt.Errorf("thaw %s: %w", p, err)
			continue
		}
		s.frozen = slices.DeleteFunc(s.frozen, func(q string) bool { return q == p })
	}
	if len(s.frozen) == 0 && s.autoThaw != nil {
		s.autoThaw.Stop()
		s.autoThaw = nil
	}
	return firstErr
}
