//go:build tools

// Package tools pins the upstream commands scripts/anp-bin builds from this module: the
// konnectivity server and agent of apiserver-network-proxy v0.0.30. Requiring the main module and
// konnectivity-client at the same tag here stands in for the upstream go.mod's
// "replace konnectivity-client => ./konnectivity-client", which applies only when upstream is
// the main module. The blank imports keep both in go.mod (go mod tidy would drop an unused
// requirement); nothing here is ever built.
package tools

import (
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/agent"
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/server"
)
