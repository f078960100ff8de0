package acpi

import (
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/layout"
)

// A minimal AML encoder for the few objects the DSDT needs
// (ACPI 6.5, chapter 20).
const (
	amlZeroOp       = 0x00
	amlOneOp        = 0x01
	amlNameOp       = 0x08
	amlBytePrefix   = 0x0a
	amlPackageOp    = 0x12
	dsdtRevision    = 2 // 64-bit integers
	amlPkgLenOneMax = 0x3f
)

// amlInteger encodes a small integer constant.
func amlInteger(v uint8) []byte {
	switch v {
	case 0:
		return []byte{amlZeroOp}
	case 1:
		return []byte{amlOneOp}
	}
	return []byte{amlBytePrefix, v}
}

// amlPkgLength encodes a PkgLength for a body of n bytes (the encoding's
// own bytes count too).
func amlPkgLength(n int) []byte {
	if n+1 <= amlPkgLenOneMax {
		return []byte{uint8(n + 1)}
	}
	for extra := 1; extra <= 3; extra++ {
		t := n + 1 + extra
		if t < 1<<(4+8*extra) {
			b := []byte{uint8(extra<<6) | uint8(t&0xf)}
			for i := range extra {
				b = append(b, uint8(t>>(4+8*i)))
			}
			return b
		}
	}
	panic(fmt.Sprintf("AML package of %d bytes", n))
}

// amlPackage encodes Package(){elems...}.
func amlPackage(elems ...[]byte) []byte {
	body := []byte{uint8(len(elems))}
	for _, e := range elems {
		body = append(body, e...)
	}
	return append(append([]byte{amlPackageOp}, amlPkgLength(len(body))...), body...)
}

// amlName encodes Name(name, value); name is a 4-character NameSeg.
func amlName(name string, value []byte) []byte {
	if len(name) != 4 {
		panic("AML NameSeg must be 4 characters: " + name)
	}
	return append(append([]byte{amlNameOp}, name...), value...)
}

// dsdt holds \_S5_: the SLP_TYP value Linux writes, with SLP_EN, to the
// sleep control register on poweroff. The second element (SLP_TYPb) is
// unused in hardware-reduced mode.
func dsdt() []byte {
	s5 := amlInteger(layout.ACPIS5SleepType)
	aml := amlName("_S5_", amlPackage(s5, s5, amlInteger(0), amlInteger(0)))
	return table("DSDT", dsdtRevision, aml)
}
