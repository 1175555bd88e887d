"""The report of scripts/soak.sh: RSS and lag over time, event-to-bill
latency, and the bills against the reference.

usage: soak_report.py BROKERS SAMPLES REF_BILLS DURATION RATE

Reads the input and output topics back from the broker (until nothing
arrives for 5 s: tansu's end offsets stop short of the last batch, so what
is counted is what was read).
"""
import json
import sys
import time
from collections import defaultdict

from confluent_kafka import Consumer, TopicPartition

brokers, samples_path, ref_path, duration, rate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
TZ_OFFSET_MS = 8 * 3600 * 1000  # Asia/Shanghai, no DST


def read_all(topic):
    c = Consumer({"bootstrap.servers": brokers, "group.id": "soak-report", "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out, last = [], time.time()
    while time.time() - last < 5:
        msgs = c.consume(10000, 0.5)
        if msgs:
            last = time.time()
        for m in msgs:
            if m.error() is None:
                out.append((m.partition(), m.offset(), m.timestamp()[1], m.value()))
    c.close()
    return out


def month_of(ms):
    t = time.gmtime((ms + TZ_OFFSET_MS) // 1000)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


# Input: append times of each key's events, in partition order.
events = read_all("gateway-events")
events.sort(key=lambda r: (r[0], r[1]))
appended = defaultdict(list)
for _, _, ts, value in events:
    e = json.loads(value)
    appended[f"{e['account_id']}/{month_of(e['time'])}"].append(ts)

# Output: each bill record's time and usage; the latency of an event is the
# time of the first record whose calls include it.
bills = read_all("gateway-bills")
bills.sort(key=lambda r: (r[0], r[1]))
latest, covered, latencies = {}, defaultdict(int), []
for _, _, ts, value in bills:
    b = json.loads(value)
    key = f"{b['account_id']}/{b['month']}"
    latest[key] = b
    calls, seen = b["usage"]["calls"], covered[key]
    for t in appended[key][seen:calls]:
        latencies.append(ts - t)
    covered[key] = max(seen, calls)
never = sum(len(v) - covered[k] for k, v in appended.items())

ref = {}
for line in open(ref_path):
    b = json.loads(line)
    ref[f"{b['account_id']}/{b['month']}"] = b["content_hash"]
equal = sum(1 for k, h in ref.items() if k in latest and latest[k]["content_hash"] == h)

samples = []
for line in open(samples_path):
    parts = line.split()
    if len(parts) >= 5 and parts[1].isdigit():
        rocks = tuple(int(x) for x in parts[5:9]) if len(parts) >= 9 else (0, 0, 0, 0)
        samples.append((int(parts[0]), int(parts[1]) // 1024, int(float(parts[2] or 0)), int(float(parts[3] or 0)), parts[4], rocks))
load = [s for s in samples if s[4] == "load"]
warm = [s for s in load if s[0] >= duration / 4]
drift = (max(s[1] for s in warm) - min(s[1] for s in warm)) / min(s[1] for s in warm) * 100 if warm else float("nan")
first_warm = warm[0][1] if warm else 0
# RocksDB's memtables fill and flush in a sawtooth (up to the configured
# bound) and its block cache fills up to its capacity: both are in RSS, both
# bounded by configuration. Growth is read two more ways: the highest RSS of
# the last quarter against the highest of the second (peak to peak, so the
# sawtooth's phase does not count), and the spread of RSS less what RocksDB
# reports for its memtables and block cache (memory it holds under its own
# bounds).
second = [s for s in load if duration / 4 <= s[0] < duration / 2]
fourth = [s for s in load if s[0] >= duration * 3 / 4]
q2 = [s[1] for s in second]
q4 = [s[1] for s in fourth]
peak_drift = (max(q4) - max(q2)) / max(q2) * 100 if q2 and q4 else float("nan")
# The block cache fills toward its fixed capacity as the store's files grow,
# which over a run that compresses a day of events into minutes takes the
# whole run: the same peak to peak less the cache is growth from elsewhere.
q2_less_cache = [s[1] - s[5][1] for s in second]
q4_less_cache = [s[1] - s[5][1] for s in fourth]
cache_drift = (max(q4_less_cache) - max(q2_less_cache)) / max(q2_less_cache) * 100 if q2_less_cache and q4_less_cache else float("nan")
cache_q2 = max((s[5][1] for s in second), default=0)
cache_q4 = max((s[5][1] for s in fourth), default=0)
rest = [s[1] - s[5][0] - s[5][1] for s in warm]
rest_drift = (max(rest) - min(rest)) / min(rest) * 100 if rest and min(rest) > 0 else float("nan")
last = load[-1][1] if load else 0
latencies.sort()


def pct(p):
    return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] / 1000 if latencies else float("nan")


bill_rate = (samples[-1][3] - samples[0][3]) / max(1, samples[-1][0] - samples[0][0]) if samples else 0
print()
print("| figure | value |")
print("| --- | --- |")
print(f"| offered | {rate} msg/s for {duration} s |")
print(f"| events read back from the input topic | {len(events)} |")
print(f"| bill records read back from the output topic | {len(bills)} ({len(latest)} keys; {bill_rate:.0f} records/s produced over the run) |")
print(f"| RSS after warm-up (first quarter) | first {first_warm} MB, last {last} MB, max-min spread {drift:.1f}% |")
print(f"| RSS peak, second quarter -> last quarter | {max(q2, default=0)} -> {max(q4, default=0)} MB: {peak_drift:+.1f}% |")
print(f"| RSS peak less the block cache, second quarter -> last quarter | {max(q2_less_cache, default=0)} -> {max(q4_less_cache, default=0)} MB: {cache_drift:+.1f}% (block cache at most {cache_q2} -> {cache_q4} MB) |")
print(f"| RSS less RocksDB memtables and block cache, after warm-up | {min(rest, default=0)}-{max(rest, default=0)} MB: spread {rest_drift:.1f}% |")
print(f"| consumer lag | max {max((s[2] for s in load), default=0)} messages under load; drained in {sum(1 for s in samples if s[4] == 'drain' and s[2] > 0) * (samples[1][0] - samples[0][0] if len(samples) > 1 else 0)} s |")
print(f"| event-to-bill latency | p50 {pct(50):.1f} s, p99 {pct(99):.1f} s, max {pct(100):.1f} s over {len(latencies)} events ({never} never billed) |")
print(f"| latest bill per key = reference (file replay with accounts) | {equal} of {len(ref)} keys{'' if equal == len(ref) == len(latest) else ' -- MISMATCH'} |")
print()
print("RSS (MB) and lag over time (s: rss lag):", " ".join(f"{s[0]}:{s[1]}/{s[2]}" for s in samples[:: max(1, len(samples) // 30)]))
print(
    "RocksDB and dedupe memory over time, MB (s: memtables/block cache/table readers/dedupe hashes):",
    " ".join(f"{s[0]}:{s[5][0]}/{s[5][1]}/{s[5][2]}/{s[5][3]}" for s in samples[:: max(1, len(samples) // 30)]),
)
ok = equal == len(ref) == len(latest) and never == 0
sys.exit(0 if ok else 1)
