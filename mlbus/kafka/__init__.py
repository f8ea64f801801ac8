"""Thin wrappers over confluent-kafka: connection config, the event producer, the consumer
loop, dead letters, topic provisioning and group-less readers."""
