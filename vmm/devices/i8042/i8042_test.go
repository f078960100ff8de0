package i8042

import (
	"log/slog"
	"testing"
)

type op struct {
	write bool
	off   uint64
	val   byte // written, or expected on read
}

func TestSequences(t *testing.T) {
	tests := []struct {
		name   string
		ops    []op
		resets int
	}{
		{"reboot=k", []op{{false, offCommand, statusSYS | statusUnlock}, {true, offCommand, 0xfe}}, 1},
		{"self test", []op{{true, offCommand, cmdSelfTest}, {false, offCommand, statusSYS | statusUnlock | statusCMD | statusOBF}, {false, offData, selfTestOK}, {false, offCommand, statusSYS | statusUnlock | statusCMD}}, 0},
		{"read CTR", []op{{true, offCommand, cmdReadCTR}, {false, offData, ctrDefault}}, 0},
		{"write CTR", []op{{true, offCommand, cmdWriteCTR}, {true, offData, 0x30}, {true, offCommand, cmdReadCTR}, {false, offData, 0x30}}, 0},
		{"output port reset", []op{{true, offCommand, cmdWriteOut}, {true, offData, 0x02}}, 1},
		{"output port keeps running", []op{{true, offCommand, cmdWriteOut}, {true, offData, 0x03}}, 0},
		{"pulse other line", []op{{true, offCommand, 0xfd}}, 0},
		{"keyboard byte acked", []op{{true, offData, 0xff}, {false, offData, kbdAck}}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resets := 0
			c := New(func() { resets++ }, slog.New(slog.DiscardHandler))
			for i, o := range tt.ops {
				if o.write {
					c.Write(o.off, []byte{o.val})
					continue
				}
				b := []byte{0}
				c.Read(o.off, b)
				if b[0] != o.val {
					t.Errorf("op %d: read port offset %d = %#x, want %#x", i, o.off, b[0], o.val)
				}
			}
			if resets != tt.resets {
				t.Errorf("%d resets, want %d", resets, tt.resets)
			}
		})
	}
}

func TestPorts(t *testing.T) {
	resets := 0
	c := New(func() { resets++ }, slog.New(slog.DiscardHandler))
	data, cmd := c.Ports()
	cmd.Write(0, []byte{cmdSelfTest})
	b := []byte{0}
	data.Read(0, b)
	if b[0] != selfTestOK {
		t.Errorf("self-test through ports = %#x, want %#x", b[0], selfTestOK)
	}
	cmd.Write(0, []byte{0xfe})
	if resets != 1 {
		t.Errorf("%d resets through the command port, want 1", resets)
	}
}

func TestState(t *testing.T) {
	c := New(nil, slog.New(slog.DiscardHandler))
	c.Write(offCommand, []byte{cmdWriteCTR})
	s := c.State()
	c2 := New(nil, slog.New(slog.DiscardHandler))
	if err := c2.Restore(s); err != nil {
		t.Fatal(err)
	}
	c2.Write(offData, []byte{0x11})
	if c2.State().CTR != 0x11 {
		t.Error("pending CTR write lost across restore")
	}
	if err := c2.Restore(State{}); err == nil {
		t.Error("restore accepted version 0")
	}
}
