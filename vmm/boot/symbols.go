package boot

import (
	"cmp"
	"debug/elf"
	"fmt"
	"slices"
)

// Symbols is a kernel's function symbol table, for naming guest
// instruction addresses (the DSM's RIP profile, docs/dsm.md). Only an ELF
// kernel (vmlinux, not stripped) has one; a bzImage does not.
type Symbols struct {
	funcs []symbol // sorted by address
}

type symbol struct {
	addr, size uint64
	name       string
}

// LoadSymbols reads the function symbols of the ELF file at path.
func LoadSymbols(path string) (*Symbols, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("kernel symbols: %w", err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		return nil, fmt.Errorf("kernel symbols of %s: %w", path, err)
	}
	t := &Symbols{}
	for _, s := range syms {
		if elf.ST_TYPE(s.Info) == elf.STT_FUNC && s.Value != 0 {
			t.funcs = append(t.funcs, symbol{addr: s.Value, size: s.Size, name: s.Name})
		}
	}
	if len(t.funcs) == 0 {
		return nil, fmt.Errorf("kernel symbols: %s has no function symbols", path)
	}
	slices.SortFunc(t.funcs, func(a, b symbol) int { return cmp.Compare(a.addr, b.addr) })
	return t, nil
}

// Lookup names addr as "function+0xoffset", or "" if no function holds it.
func (t *Symbols) Lookup(addr uint64) string {
	i, found := slices.BinarySearchFunc(t.funcs, addr, func(s symbol, a uint64) int { return cmp.Compare(s.addr, a) })
	if !found {
		i--
	}
	if i < 0 {
		return ""
	}
	s := t.funcs[i]
	// A symbol without a size (assembly) holds everything up to the next.
	if s.size != 0 && addr-s.addr >= s.size {
		return ""
	}
	return fmt.Sprintf("%s+%#x", s.name, addr-s.addr)
}
