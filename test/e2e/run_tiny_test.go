//go:build e2e && !e2eimages

package e2e

// runDebian: make e2e runs TestRun on the tiny image only; see
// run_debian_test.go.
const runDebian = false
