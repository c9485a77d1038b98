"""Logger, Tracer and Metrics shared by every function: one instance each, imported from here."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = "telematics-registration"
NAMESPACE = "TelematicsRegistration"

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
