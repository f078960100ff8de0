package policies

// Request is a stub until admission lands.
type Request struct {
	User       string
	Groups     []string
	Partition  string
	Image      string
	Nodes      int
	CPUs       int
	MemPerNode Size
}

// Admit is a stub until admission lands.
func (p *Policy) Admit(req Request) (any, error) { return nil, nil }
