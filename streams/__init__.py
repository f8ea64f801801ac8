"""Stream processors (faust-streaming): serving metrics, drift and alerts from inference.logged.

Imports mlbus/ and schemas/ only; talks to other components through topics."""
