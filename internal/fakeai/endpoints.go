package fakeai

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"net/http"
	"unicode/utf8"
)

// models are the ids GET /v1/models lists.
var models = []string{"gpt-4o-mini", "gpt-4o", "text-embedding-3-small"}

type modelJSON struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

type listJSON[T any] struct {
	Object string `json:"object"`
	Data   []T    `json:"data"`
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	list := listJSON[modelJSON]{Object: "list", Data: []modelJSON{}}
	for _, id := range models {
		list.Data = append(list.Data, modelJSON{ID: id, Object: "model", Created: 1700000000, OwnedBy: "system"})
	}
	s.writeJSON(w, r, http.StatusOK, list, nil)
}

// embeddingDims is the vector length when the request does not ask for
// dimensions; real models use hundreds, but tests only need determinism.
const embeddingDims = 8

type embeddingBody struct {
	Input          json.RawMessage `json:"input"`
	Model          string          `json:"model"`
	EncodingFormat string          `json:"encoding_format"`
	Dimensions     int             `json:"dimensions"`
}

type embeddingJSON struct {
	Object    string `json:"object"`
	Index     int    `json:"index"`
	Embedding any    `json:"embedding"` // []float32, or a base64 string
}

type embeddingListJSON struct {
	Object string          `json:"object"`
	Data   []embeddingJSON `json:"data"`
	Model  string          `json:"model"`
	Usage  struct {
		PromptTokens int `json:"prompt_tokens"`
		TotalTokens  int `json:"total_tokens"`
	} `json:"usage"`
}

// handleEmbeddings answers with a unit vector derived from a hash of each
// input, so equal inputs get equal vectors across runs.
func (s *Server) handleEmbeddings(w http.ResponseWriter, r *http.Request) {
	data, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	var b embeddingBody
	if err := json.Unmarshal(data, &b); err != nil {
		s.writeError(w, r, http.StatusBadRequest, "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.", "invalid_request_error", "", "", nil)
		return
	}
	inputs, ok := embeddingInputs(b.Input)
	if !ok || b.Model == "" {
		s.writeError(w, r, http.StatusBadRequest, "'input' and 'model' are required: input is a string, an array of strings or an array of token arrays.", "invalid_request_error", "input", "", nil)
		return
	}
	dims := b.Dimensions
	if dims <= 0 {
		dims = embeddingDims
	}
	out := embeddingListJSON{Object: "list", Model: b.Model, Data: []embeddingJSON{}}
	chars := 0
	for i, in := range inputs {
		chars += utf8.RuneCountInString(in)
		vec := embed(in, dims)
		var e any = vec
		if b.EncodingFormat == "base64" {
			e = encodeFloats(vec)
		}
		out.Data = append(out.Data, embeddingJSON{Object: "embedding", Index: i, Embedding: e})
	}
	out.Usage.PromptTokens = max(chars/4, 1)
	out.Usage.TotalTokens = out.Usage.PromptTokens
	s.writeJSON(w, r, http.StatusOK, out, nil)
}

// embeddingInputs returns the texts to embed. A token array stands for its
// JSON text, which is as good as any text for a hash.
func embeddingInputs(raw json.RawMessage) ([]string, bool) {
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []string{one}, true
	}
	var many []json.RawMessage
	if json.Unmarshal(raw, &many) != nil || len(many) == 0 {
		return nil, false
	}
	var out []string
	for _, m := range many {
		var s string
		if json.Unmarshal(m, &s) != nil {
			s = string(m)
		}
		out = append(out, s)
	}
	return out, true
}

// embed returns a deterministic unit vector for text.
func embed(text string, dims int) []float32 {
	vec := make([]float32, dims)
	var norm float64
	for i := range vec {
		h := fnv.New64a()
		fmt.Fprintf(h, "%d:%s", i, text)
		v := float64(h.Sum64()%2001)/1000 - 1 // in [-1, 1]
		vec[i] = float32(v)
		norm += v * v
	}
	if norm == 0 {
		vec[0], norm = 1, 1
	}
	for i := range vec {
		vec[i] = float32(float64(vec[i]) / math.Sqrt(norm))
	}
	return vec
}

// encodeFloats is the API's base64 encoding: little-endian float32s.
func encodeFloats(vec []float32) string {
	buf := make([]byte, 4*len(vec))
	for i, f := range vec {
		binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(f))
	}
	return base64.StdEncoding.EncodeToString(buf)
}
