"""Logger and Metrics shared by every function: one instance each, imported from here.

Traces come from Lambda's active tracing (``Tracing: Active`` in template.yaml), without the X-Ray SDK: the SDK
cost about 200 ms of every cold start's import (bench/results/cold_start.md) for per-call subsegments whose
timings the service already publishes as metrics (``Upstream*Latency``).
"""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics

SERVICE = "telematics-registration"
NAMESPACE = "TelematicsRegistration"

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
