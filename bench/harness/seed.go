package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/bench/load"
	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/benchfix"
)

// A seeder stores n messages in each of sessions before they take part in
// a run: the conversation a request then continues.
type seeder func(ctx context.Context, sessions []string, n int) error

// seedChunk is how many messages go to Redis in one round trip when
// seeding.
const seedChunk = 1000

// seedHistory writes the sessions' history straight into historyproxy's
// Redis layout through the history package, the code the binary writes it
// with: benchfix.History(n), alternating user messages and replies of
// realistic length, so that the newest benchfix.HistoryLen are injected on
// every request.
func seedHistory(rdb *redis.Client, prefix string) seeder {
	store := history.NewRedis(rdb, prefix)
	return func(ctx context.Context, sessions []string, n int) error {
		msgs := benchfix.History(n)
		return forEach(ctx, sessions, 4, func(ctx context.Context, s string) error {
			for i := 0; i < n; i += seedChunk {
				t := history.Turn{Messages: msgs[i:min(i+seedChunk, n)]}
				if _, err := store.Append(ctx, s, t, history.Policy{}); err != nil {
					return fmt.Errorf("seed %s: %w", s, err)
				}
			}
			return nil
		})
	}
}

// seedFloor writes the floor proxy's streams: one entry per message, the
// same messages as seedHistory.
func seedFloor(rdb *redis.Client, prefix string) seeder {
	return func(ctx context.Context, sessions []string, n int) error {
		msgs := benchfix.History(n)
		return forEach(ctx, sessions, 4, func(ctx context.Context, s string) error {
			stream := prefix + ":{" + s + "}"
			for i := 0; i < n; i += seedChunk {
				_, err := rdb.Pipelined(ctx, func(pipe redis.Pipeliner) error {
					for _, m := range msgs[i:min(i+seedChunk, n)] {
						pipe.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"role", m.Role, "content", m.Content}})
					}
					return nil
				})
				if err != nil {
					return fmt.Errorf("seed %s: %w", stream, err)
				}
			}
			return nil
		})
	}
}

// bulkBatch is how many messages one seeding request carries at most:
// within historyproxy's default max_turn_messages (256), which refuses a
// request that would record more in one turn.
const bulkBatch = 250

// seedHTTP drives turns through a running historyproxy (its memory store
// cannot be written from outside): benchfix.HistoryLen/2 ordinary turns at
// the end, so that the window is what seedHistory stores. The older
// messages, when n is larger, come first in requests of up to bulkBatch
// short user messages each (a request without an assistant message records
// all its user messages, and the reply): 10,000 messages in 40 requests
// instead of 5,000.
func seedHTTP(url string) seeder {
	client := &http.Client{Transport: load.NewTransport(8)}
	turn := benchfix.RequestBody(false)
	return func(ctx context.Context, sessions []string, n int) error {
		turns := min(n, benchfix.HistoryLen) / 2
		var bulks [][]byte
		for left, k := n-2*turns, 0; left >= 2; {
			b := min(bulkBatch, left-1)
			bulks = append(bulks, bulkBody(k, b))
			left, k = left-b-1, k+b
		}
		return forEach(ctx, sessions, 8, func(ctx context.Context, s string) error {
			for _, body := range bulks {
				if err := post(ctx, client, url, body, s); err != nil {
					return err
				}
			}
			for range turns {
				if err := post(ctx, client, url, turn, s); err != nil {
					return err
				}
			}
			return nil
		})
	}
}

// bulkBody is a chat request of n short user messages, numbered from k.
func bulkBody(k, n int) []byte {
	type message struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	}
	req := struct {
		Model    string    `json:"model"`
		Messages []message `json:"messages"`
	}{Model: benchfix.Model}
	for i := range n {
		req.Messages = append(req.Messages, message{"user", "Earlier message " + strconv.Itoa(k+i) + "."})
	}
	b, err := json.Marshal(req)
	if err != nil {
		panic(err) // a fixed shape of strings cannot fail to marshal
	}
	return b
}

func post(ctx context.Context, client *http.Client, url string, body []byte, session string) error {
	req, err := load.NewRequest(ctx, url, body, session, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("seed %s: %w", session, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("seed %s: status %d: %.300s", session, resp.StatusCode, b)
	}
	return nil
}

// forEach calls fn for every item, workers at a time, and returns the
// first error.
func forEach(ctx context.Context, items []string, workers int, fn func(context.Context, string) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	next := make(chan string)
	var wg sync.WaitGroup
	for range min(workers, len(items)) {
		wg.Add(1)
		go func() { // ends when next is closed
			defer wg.Done()
			for it := range next {
				if ctx.Err() != nil {
					continue
				}
				if err := fn(ctx, it); err != nil {
					cancel(err)
				}
			}
		}()
	}
	for _, it := range items {
		next <- it
	}
	close(next)
	wg.Wait()
	return context.Cause(ctx)
}
