#!/usr/bin/env bash
# Runs historyproxy's benchmarks and prints a summary (medians over -count
# runs). See bench/README.md for how to read it.
#
#   bench/run.sh                 # everything, COUNT=3
#   COUNT=5 bench/run.sh         # more runs per benchmark
#   REQUESTS=5000 bench/run.sh   # requests per proxy per BenchmarkOverhead run
#   PROFILE=1 bench/run.sh       # also a CPU profile of the proxy path
#   OUT=/tmp/hp bench/run.sh     # keep the raw output there
#
# Everything runs on loopback; redis-server is started on a free port for
# the Redis cases (they are skipped when it is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-3}
REQUESTS=${REQUESTS:-2000}
OUT=${OUT:-$(mktemp -d -t hpbench.XXXXXX)}
mkdir -p "$OUT"

run() { # name, go test args...
  local name=$1
  shift
  echo "== go test $*" >&2
  go test -run '^$' -benchmem -count "$COUNT" -timeout 30m "$@" | tee "$OUT/$name.txt" | grep -E '^(Benchmark|---|FAIL|ok|PASS)' >&2
}

run proxy -bench 'BenchmarkRewrite|BenchmarkChatRoundTrip' -benchtime 1s ./proxy/
run overhead -bench 'BenchmarkOverhead' -benchtime "${REQUESTS}x" ./bench/
run store -bench 'BenchmarkStoreAppend' -benchtime 1s ./bench/

# summary prints, per benchmark, the median of each listed unit over the
# runs; "-" when the benchmark does not report it.
summary() { # file, units...
  local file=$1
  shift
  awk -v units="$*" '
    function median(list,   a, n, i, j, t) {
      n = split(list, a, " ")
      for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    /^Benchmark/ {
      name = $1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
      if (!(name in seen)) { seen[name] = 1; order[++count] = name }
      for (i = 3; i < NF; i += 2) vals[name, $(i + 1)] = vals[name, $(i + 1)] " " $i
    }
    END {
      nu = split(units, u, " ")
      printf "%-48s", "benchmark"; for (k = 1; k <= nu; k++) printf " %14s", u[k]; printf "\n"
      for (c = 1; c <= count; c++) {
        printf "%-48s", order[c]
        for (k = 1; k <= nu; k++) {
          if ((order[c], u[k]) in vals) printf " %14.4g", median(vals[order[c], u[k]]); else printf " %14s", "-"
        }
        printf "\n"
      }
    }' "$file"
}

echo
echo "# proxy: rewrite and serial round trip (median of $COUNT)"
summary "$OUT/proxy.txt" ns/op B/op allocs/op x-bare overhead-us/op
echo
echo "# overhead: historyproxy vs bare ReverseProxy, $REQUESTS requests each (median of $COUNT)"
summary "$OUT/overhead.txt" p50-us bare-p50-us p50-overhead-us p99-overhead-us ttfb-p50-overhead-us
echo
summary "$OUT/overhead.txt" ns/op bare-ns/op B/op bare-B/op allocs/op bare-allocs/op
echo
echo "# store: Append of one keyed turn by session rate (median of $COUNT)"
summary "$OUT/store.txt" ns/op B/op allocs/op

if [ "${PROFILE:-}" = 1 ]; then
  echo
  echo "# CPU profile: BenchmarkChatRoundTrip/json/historyproxy (whole process: client, proxy, upstream)"
  go test -run '^$' -bench 'BenchmarkChatRoundTrip/json/historyproxy' -benchtime 10000x \
    -cpuprofile "$OUT/cpu.out" -o "$OUT/proxy.test" ./proxy/ >/dev/null
  go tool pprof -top -nodecount=10 "$OUT/proxy.test" "$OUT/cpu.out" 2>/dev/null | tail -n +5
  echo
  go tool pprof -top -cum -nodecount=40 -focus 'historyproxy/proxy' "$OUT/proxy.test" "$OUT/cpu.out" 2>/dev/null |
    grep -E 'flat|historyproxy|tiktoken|encoding/json\.(Marshal|Unmarshal)$|history\.' | head -20
fi
echo
echo "raw output: $OUT"
