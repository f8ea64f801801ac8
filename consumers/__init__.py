"""Services that react to events and keep state outside Kafka (lineage, workflow, archive).

Imports mlbus/ and schemas/ only; talks to other components through topics."""
