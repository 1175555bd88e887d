"""The peer of scripts/bench.sh: the same account-month aggregation written
with Quix Streams (Python, RocksDB state stores), over the same topic.

Per event: JSON decode, drop a repeated request_id (state), classify public
outbound bytes as gatebill does, add calls / frontend errors / public bytes
to the (account, billing month, hour) aggregate in state. Consumes exactly N
messages and exits.

usage: peer_quix.py BROKERS TOPIC N STATE_DIR
"""
import sys
import time

from quixstreams import Application
from quixstreams.models.topics import manager as _topic_manager

# tansu does not report `retention.ms`/`retention.bytes` in DescribeConfigs,
# and Quix derives a changelog topic config from them even with changelogs
# off. Supply "unlimited" (Kafka's -1) where the broker reports nothing.
_derive = _topic_manager.TopicManager.derive_topic_config


def _derive_with_defaults(cls, topics):
    topics = list(topics)
    for t in topics:
        for k in ("retention.ms", "retention.bytes"):
            t.broker_config.extra_config.setdefault(k, "-1")
    return _derive(topics)


_topic_manager.TopicManager.derive_topic_config = classmethod(_derive_with_defaults)

brokers, topic_name, n, state_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
SHANGHAI = 8 * 3600


def public_bytes(e):
    out = e["response_bytes"] if e["client_network"] == "public" else 0
    b = e["backend"]
    if b["type"] == "http":
        if not (b["in_cloud"] and b.get("region") == e["region"] and b["address"] == "private"):
            out += b["request_bytes"]
    elif b["type"] == "scf" and b["region"] != e["region"]:
        out += b["request_bytes"]
    return out


def aggregate(e, state):
    rid = "r:" + e["request_id"]
    if state.get(rid):
        return
    state.set(rid, 1)
    local = e["time"] // 1000 + SHANGHAI
    month = time.strftime("%Y-%m", time.gmtime(local))
    key = "m:%s:%d" % (month, local // 3600)
    agg = state.get(key) or [0, 0, 0]
    agg[0] += 1
    agg[1] += 1 if e.get("frontend_error") else 0
    agg[2] += public_bytes(e)
    state.set(key, agg)


app = Application(
    broker_address=brokers,
    consumer_group="quix-peer",
    auto_offset_reset="earliest",
    state_dir=state_dir,
    use_changelog_topics=False,
    auto_create_topics=False,
    loglevel="WARNING",
)
sdf = app.dataframe(app.topic(topic_name, value_deserializer="json"))
sdf = sdf.update(aggregate, stateful=True)
started = time.time()
app.run(count=n, collect=False)
print("quix: %d messages in %.2f s" % (n, time.time() - started))
