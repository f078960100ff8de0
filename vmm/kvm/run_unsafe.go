package kvm

import (
	"encoding/binary"
	"sync/atomic"
	"unsafe"
)

// runHeader mirrors the fixed head of struct kvm_run; the exit-specific
// union starts at offset 32.
type runHeader struct {
	RequestInterruptWindow     uint8
	ImmediateExit              uint8
	_                          [6]uint8
	ExitReason                 uint32
	ReadyForInterruptInjection uint8
	IfFlag                     uint8
	Flags                      uint16
	CR8                        uint64
	APICBase                   uint64
}

const runUnionOffset = 32

var _ [runUnionOffset]byte = [unsafe.Sizeof(runHeader{})]byte{}

// runPage is a vCPU's mmap'ed struct kvm_run.
type runPage []byte

func (r runPage) header() *runHeader { return (*runHeader)(unsafe.Pointer(&r[0])) }

// setImmediateExit is called from other threads (kickers): the kernel reads
// the byte on entry to KVM_RUN, so a plain store that is visible before the
// kick signal is sent is all that is needed. atomic makes the intent plain.
func (r runPage) setImmediateExit(v bool) {
	p := (*uint32)(unsafe.Pointer(&r[0])) // bytes 0..3: request_interrupt_window, immediate_exit, padding
	for {
		old := atomic.LoadUint32(p)
		nv := old &^ 0xff00
		if v {
			nv |= 0x0100
		}
		if atomic.CompareAndSwapUint32(p, old, nv) {
			return
		}
	}
}

func (r runPage) u8(off int) uint8   { return r[runUnionOffset+off] }
func (r runPage) u16(off int) uint16 { return binary.LittleEndian.Uint16(r[runUnionOffset+off:]) }
func (r runPage) u32(off int) uint32 { return binary.LittleEndian.Uint32(r[runUnionOffset+off:]) }
func (r runPage) u64(off int) uint64 { return binary.LittleEndian.Uint64(r[runUnionOffset+off:]) }

// Offsets inside the kvm_run union, per exit type.
const (
	// struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
	ioDirection  = 0
	ioSize       = 1
	ioPort       = 2
	ioCount      = 4
	ioDataOffset = 8
	// struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
	mmioPhysAddr = 0
	mmioData     = 8
	mmioLen      = 16
	mmioIsWrite  = 20
	// struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
	internalSuberror = 0
	internalNData    = 4
	internalData     = 8
	// struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
	systemEventType = 0
	// struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
	failEntryReason = 0
)
