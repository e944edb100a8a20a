//go:build tools

// Package tools pins the VictoriaLogs server scripts/vlogs-bin builds from this module: the
// log-shipper's real store in tests and the demo (it accepts the Loki push API and OTLP logs,
// and answers LogsQL queries). The blank import keeps the requirement in go.mod (go mod tidy
// would drop an unused one); nothing here is ever built.
package tools

import (
	_ "github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs"
)
