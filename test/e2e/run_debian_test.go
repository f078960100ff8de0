//go:build e2e && e2eimages

package e2e

// runDebian: TestRun also boots the default Debian image (make e2e-images).
// It is left out of make e2e: Debian kernels now and then take the whole
// virt node down under nested TCG (docs/testing.md), which a retry inside
// the node cannot survive.
const runDebian = true
