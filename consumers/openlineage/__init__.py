"""OpenLineage: the log's datasets, training runs, promotions and deployments sent as
OpenLineage run events to Marquez or any lineage tool that reads them.

Imports mlbus/ and schemas/ only; talks to other components through topics."""
