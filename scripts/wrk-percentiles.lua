-- wrk -s scripts/wrk-percentiles.lua URL: after the run, one line with the latency percentiles wrk's --latency does
-- not print (the tail beyond p99 is where two proxies at equal throughput differ), for scripts/http-interleave.sh:
--   percentiles requests=N rps=R errors=E p50=MS p90=MS p99=MS p99.9=MS max=MS
done = function(summary, latency, requests)
  local e = summary.errors
  local function ms(p) return latency:percentile(p) / 1000 end
  io.write(string.format(
    "percentiles requests=%d rps=%.0f errors=%d p50=%.3f p90=%.3f p99=%.3f p99.9=%.3f max=%.3f\n",
    summary.requests, summary.requests / (summary.duration / 1e6),
    e.connect + e.read + e.write + e.status + e.timeout,
    ms(50), ms(90), ms(99), ms(99.9), latency.max / 1000))
end
