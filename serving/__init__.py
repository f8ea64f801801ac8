"""Model server: Open Inference Protocol over HTTP and Kafka; publishes inference.logged
and deployment.updated.

Imports mlbus/ and schemas/ only; talks to other components through topics."""
