#!/bin/sh
# Generated from the topic catalog (schemas/catalog.py) by `mlbus topics export
# --format sh`; do not edit. Creates every contract topic that is missing.
set -eu
: "${BOOTSTRAP:=kafka-1:9092}"
: "${KAFKA_TOPICS:=/opt/kafka/bin/kafka-topics.sh}"
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic dataset.created --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic dataset.validated --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic training.requested --partitions 6 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic training.started --partitions 6 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic training.progress --partitions 6 --replication-factor 3 --config retention.ms=2592000000 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic training.completed --partitions 6 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic training.failed --partitions 6 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic search.requested --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic search.pruned --partitions 6 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic search.completed --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic pipeline.defined --partitions 1 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic model.promoted --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic model.rejected --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic model.traffic --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic deployment.updated --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic inference.requests --partitions 6 --replication-factor 3 --config retention.ms=604800000 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic inference.results --partitions 6 --replication-factor 3 --config retention.ms=604800000 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic inference.logged --partitions 6 --replication-factor 3 --config retention.ms=604800000 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic inference.feedback --partitions 6 --replication-factor 3 --config retention.ms=604800000 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic serving.accuracy --partitions 3 --replication-factor 3 --config retention.ms=7776000000 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic serving.metrics --partitions 3 --replication-factor 3 --config retention.ms=7776000000 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic serving.alert --partitions 3 --replication-factor 3 --config retention.ms=-1 --config cleanup.policy=delete --config min.insync.replicas=2
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic mlbus.deadletter --partitions 3 --replication-factor 3 --config retention.ms=7776000000 --config cleanup.policy=delete --config min.insync.replicas=2 --config max.message.bytes=16777216
