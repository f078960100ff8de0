// Package serial emulates a 16550A UART (the PC's COM ports) well enough for
// Linux's 8250 driver to run interrupt-driven: console output, an
// interactive tty, and input injected by the VMM.
package serial

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/bus"
)

// Register offsets from the base port.
const (
	regData = 0 // RBR (read), THR (write); DLL when DLAB
	regIER  = 1 // DLM when DLAB
	regIIR  = 2 // IIR (read), FCR (write)
	regLCR  = 3
	regMCR  = 4
	regLSR  = 5
	regMSR  = 6
	regSCR  = 7

	// Size is the register window size: register on the port-I/O bus at
	// layout.COM1Port with this size.
	Size = 8
)

const (
	ierRDA  = 0x01 // received data available
	ierTHRE = 0x02 // transmit holding register empty
	ierMask = 0x0f

	iirNone   = 0x01
	iirTHRE   = 0x02
	iirRDA    = 0x04
	iirFIFOEn = 0xc0

	fcrEnable  = 0x01
	fcrClearRX = 0x02

	lcrDLAB = 0x80

	mcrLoop = 0x10

	lsrDR   = 0x01
	lsrTHRE = 0x20
	lsrTEMT = 0x40

	msrCTS = 0x10
	msrDSR = 0x20
	msrRI  = 0x40
	msrDCD = 0x80

	// rxMax bounds queued input; Input refuses what does not fit.
	rxMax = 4096
)

// ErrClosed is returned by Pump after Close.
var ErrClosed = errors.New("serial: closed")

// Serial is a 16550A UART. Transmission is instantaneous: a byte written to
// THR goes straight to the output writer and THR is empty again.
type Serial struct {
	out io.Writer
	irq bus.Interrupt
	log *slog.Logger

	mu        sync.Mutex
	dll, dlm  byte
	ier       byte
	lcr       byte
	mcr       byte
	scr       byte
	fifo      bool // FIFOs enabled (FCR bit 0)
	threPend  bool // THR-empty interrupt condition latched
	line      bool // interrupt output level last computed
	rx        []byte
	room      chan struct{} // closed and replaced when rx drains
	closed    bool
	outFailed bool
}

var _ bus.Device = (*Serial)(nil)

// New returns a UART that writes guest output to out and raises irq.
func New(out io.Writer, irq bus.Interrupt, log *slog.Logger) *Serial {
	if log == nil {
		log = slog.Default()
	}
	// Divisor 12 = 9600 baud, the power-on value Linux will overwrite.
	return &Serial{out: out, irq: irq, log: log, dll: 12, room: make(chan struct{})}
}

// Read implements bus.Device; only byte accesses are meaningful.
func (s *Serial) Read(offset uint64, data []byte) {
	clear(data)
	if len(data) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	data[0] = s.readReg(offset)
	s.update()
}

func (s *Serial) readReg(offset uint64) byte {
	dlab := s.lcr&lcrDLAB != 0
	switch offset {
	case regData:
		if dlab {
			return s.dll
		}
		if len(s.rx) == 0 {
			return 0
		}
		b := s.rx[0]
		s.rx = s.rx[1:]
		if len(s.rx) == 0 {
			close(s.room)
			s.room = make(chan struct{})
		}
		return b
	case regIER:
		if dlab {
			return s.dlm
		}
		return s.ier
	case regIIR:
		id := s.pending()
		if id == iirTHRE {
			// Reading IIR when THRE is the source acknowledges it.
			s.threPend = false
		}
		if s.fifo {
			id |= iirFIFOEn
		}
		return id
	case regLCR:
		return s.lcr
	case regMCR:
		return s.mcr
	case regLSR:
		v := byte(lsrTHRE | lsrTEMT)
		if len(s.rx) > 0 {
			v |= lsrDR
		}
		return v
	case regMSR:
		if s.mcr&mcrLoop != 0 {
			// Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD;
			// Linux's probe checks this.
			m := s.mcr
			var v byte
			if m&0x01 != 0 {
				v |= msrDSR
			}
			if m&0x02 != 0 {
				v |= msrCTS
			}
			if m&0x04 != 0 {
				v |= msrRI
			}
			if m&0x08 != 0 {
				v |= msrDCD
			}
			return v
		}
		return msrDCD | msrDSR | msrCTS
	case regSCR:
		return s.scr
	}
	return 0
}

// Write implements bus.Device.
func (s *Serial) Write(offset uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	v := data[0]
	s.mu.Lock()
	defer s.mu.Unlock()
	dlab := s.lcr&lcrDLAB != 0
	switch offset {
	case regData:
		if dlab {
			s.dll = v
			break
		}
		s.transmit(v)
		s.threPend = true // the byte left at once: THR is empty again
	case regIER:
		if dlab {
			s.dlm = v
			break
		}
		if v&ierTHRE != 0 && s.ier&ierTHRE == 0 {
			// A 16550 interrupts as soon as THRE is enabled while THR is
			// empty; Linux's startup probe and start_tx rely on it.
			s.threPend = true
		}
		s.ier = v & ierMask
	case regIIR: // FCR
		s.fifo = v&fcrEnable != 0
		if v&fcrClearRX != 0 {
			s.rx = nil
		}
	case regLCR:
		s.lcr = v
	case regMCR:
		s.mcr = v
	case regSCR:
		s.scr = v
	}
	s.update()
}

func (s *Serial) transmit(b byte) {
	if s.mcr&mcrLoop != 0 {
		if len(s.rx) < rxMax {
			s.rx = append(s.rx, b)
		}
		return
	}
	if _, err := s.out.Write([]byte{b}); err != nil && !s.outFailed {
		s.outFailed = true // log once, not per byte
		s.log.Error("serial: writing guest output failed; further output errors are not logged", "err", err)
	}
}

// pending returns the IIR interrupt ID of the highest-priority enabled
// condition.
func (s *Serial) pending() byte {
	switch {
	case s.ier&ierRDA != 0 && len(s.rx) > 0:
		return iirRDA
	case s.ier&ierTHRE != 0 && s.threPend:
		return iirTHRE
	}
	return iirNone
}

// update recomputes the interrupt output and triggers on a rising edge,
// which is how the ISA IRQ line of a real UART reaches an edge-triggered
// IOAPIC pin.
func (s *Serial) update() {
	line := s.pending() != iirNone
	if line && !s.line {
		if err := s.irq.Trigger(); err != nil {
			s.log.Error("serial: interrupt", "err", err)
		}
	}
	s.line = line
}

// Input queues bytes for the guest to read and raises the data-ready
// interrupt. It returns how many bytes fit (the rest is not queued).
func (s *Serial) Input(p []byte) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := min(len(p), rxMax-len(s.rx))
	if n <= 0 || s.closed {
		return 0
	}
	s.rx = append(s.rx, p[:n]...)
	s.update()
	return n
}

// Pump copies r into the guest's receive buffer, waiting for the guest to
// drain it when full, until r fails or the UART is closed. Run it on its
// own goroutine, e.g. go s.Pump(os.Stdin).
func (s *Serial) Pump(r io.Reader) error {
	buf := make([]byte, 256)
	for {
		n, err := r.Read(buf)
		for p := buf[:n]; len(p) > 0; {
			s.mu.Lock()
			room, closed := s.room, s.closed
			s.mu.Unlock()
			if closed {
				return ErrClosed
			}
			k := s.Input(p)
			p = p[k:]
			if len(p) > 0 {
				<-room
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("serial: input: %w", err)
		}
	}
}

// Close stops Pump (after its current read returns).
func (s *Serial) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.closed = true
		close(s.room)
	}
	return nil
}

// StateVersion is the current version of State.
const StateVersion = 1

// State is the UART's register state (version 1).
type State struct {
	Version  uint32
	DLL, DLM byte
	IER      byte
	LCR      byte
	MCR      byte
	SCR      byte
	FIFO     bool
	THREPend bool
	Line     bool
	RX       []byte // received bytes not yet read by the guest
}

// State captures the UART.
func (s *Serial) State() State {
	s.mu.Lock()
	defer s.mu.Unlock()
	return State{Version: StateVersion, DLL: s.dll, DLM: s.dlm, IER: s.ier, LCR: s.lcr, MCR: s.mcr, SCR: s.scr,
		FIFO: s.fifo, THREPend: s.threPend, Line: s.line, RX: append([]byte(nil), s.rx...)}
}

// Restore loads st. If an interrupt was pending it is delivered again,
// since the edge may have been lost with the old VM.
func (s *Serial) Restore(st State) error {
	if st.Version != StateVersion {
		return fmt.Errorf("serial state version %d, want %d", st.Version, StateVersion)
	}
	if len(st.RX) > rxMax {
		return fmt.Errorf("serial state holds %d input bytes, more than %d", len(st.RX), rxMax)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dll, s.dlm, s.ier, s.lcr, s.mcr, s.scr = st.DLL, st.DLM, st.IER&ierMask, st.LCR, st.MCR, st.SCR
	s.fifo, s.threPend = st.FIFO, st.THREPend
	s.rx = append([]byte(nil), st.RX...)
	s.line = false
	s.update()
	return nil
}
