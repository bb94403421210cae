package proxy

import (
	"net/http"

	"github.com/historyproxy/historyproxy/wire"
)

// apiError is an error answered in OpenAI's shape; the admin API shares
// it through package wire.
type apiError = wire.Error

func badRequest(code, param, msg string) *apiError { return wire.BadRequest(code, param, msg) }

// writeError answers with e as {"error":{...}}.
func writeError(w http.ResponseWriter, e *apiError) { wire.WriteError(w, e) }
