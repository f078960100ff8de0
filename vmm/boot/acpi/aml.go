package acpi

import (
	"encoding/binary"
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

// dsdt holds \_S5_ (the SLP_TYP value Linux writes, with SLP_EN, to
// PM1a_CNT on poweroff; PM1b is absent so SLP_TYPb is unused) and, under
// \_SB, one virtio-mmio device per entry of devs.
func dsdt(devs []MMIODevice) ([]byte, error) {
	s5 := amlInteger(layout.ACPIS5SleepType)
	aml := amlName("_S5_", amlPackage(s5, s5, amlInteger(0), amlInteger(0)))
	if len(devs) > 0 {
		var body []byte
		for i, d := range devs {
			dev, err := amlVirtioDevice(i, d)
			if err != nil {
				return nil, err
			}
			body = append(body, dev...)
		}
		aml = append(aml, amlScope(`\_SB_`, body)...)
	}
	return table("DSDT", dsdtRevision, aml), nil
}

// More AML opcodes and resource descriptors (ACPI 6.5, 19.6 and 6.4).
const (
	amlScopeOp       = 0x10
	amlBufferOp      = 0x11
	amlStringPrefix  = 0x0d
	amlExtOpPrefix   = 0x5b
	amlDeviceOp      = 0x82
	resMemory32Fixed = 0x86
	resExtInterrupt  = 0x89
	resEndTag        = 0x79
	intConsumerEdge  = 0x03 // consumer, edge-triggered, active-high, exclusive
	virtioMMIOHID    = "LNRO0005"
)

// amlScope encodes Scope(name){body}; name is a root-relative path such as
// \_SB_.
func amlScope(name string, body []byte) []byte {
	inner := append([]byte(name), body...)
	return append(append([]byte{amlScopeOp}, amlPkgLength(len(inner))...), inner...)
}

// amlDevice encodes Device(name){body}.
func amlDevice(name string, body []byte) []byte {
	inner := append([]byte(name), body...)
	return append(append([]byte{amlExtOpPrefix, amlDeviceOp}, amlPkgLength(len(inner))...), inner...)
}

// amlString encodes a string constant.
func amlString(s string) []byte {
	return append(append([]byte{amlStringPrefix}, s...), 0)
}

// amlBuffer encodes Buffer(){data}.
func amlBuffer(data []byte) []byte {
	if len(data) > 0xff {
		panic("AML buffer too long for a byte size")
	}
	inner := append([]byte{amlBytePrefix, uint8(len(data))}, data...)
	return append(append([]byte{amlBufferOp}, amlPkgLength(len(inner))...), inner...)
}

// amlVirtioDevice describes virtio-mmio device i: _HID LNRO0005, _UID i,
// and _CRS with its register window and its edge-triggered interrupt.
func amlVirtioDevice(i int, d MMIODevice) ([]byte, error) {
	if i > 0xff || d.Addr > 0xffffffff || d.Size == 0 || d.Size > 0xffffffff || d.Addr+d.Size > 1<<32 {
		return nil, fmt.Errorf("ACPI: virtio-mmio device %d at %#x+%#x: must lie below 4 GiB", i, d.Addr, d.Size)
	}
	crs := []byte{resMemory32Fixed, 9, 0, 1} // length 9, read-write
	crs = binary.LittleEndian.AppendUint32(crs, uint32(d.Addr))
	crs = binary.LittleEndian.AppendUint32(crs, uint32(d.Size))
	crs = append(crs, resExtInterrupt, 6, 0, intConsumerEdge, 1)
	crs = binary.LittleEndian.AppendUint32(crs, d.IRQ)
	crs = append(crs, resEndTag, 0)
	body := amlName("_HID", amlString(virtioMMIOHID))
	body = append(body, amlName("_UID", amlInteger(uint8(i)))...)
	body = append(body, amlName("_CRS", amlBuffer(crs))...)
	return amlDevice(fmt.Sprintf("VR%02X", i), body), nil
}
