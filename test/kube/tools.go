//go:build tools

// Package tools pins modules whose files, not code, the control plane uses: the CRDs that
// sigs.k8s.io/gateway-api and istio.io/api publish. The blank imports keep them in go.mod
// (go mod tidy would drop an unused requirement); nothing here is ever built. scripts/kube-up
// finds the CRD files in the module cache with `go list -m`.
package tools

import (
	_ "istio.io/api/networking/v1"
	_ "sigs.k8s.io/gateway-api/apis/v1"
)
