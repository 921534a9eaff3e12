"""`resrank-export gateway`: the HTTP front end of a served repository (app.py), one module per
API shape (cohere.py, openai.py, tei.py), the shared limits and errors (limits.py) and the
Triton calls (triton_calls.py)."""

from resrank_export.triton.gateway.app import create_app, listen, run_gateway
from resrank_export.triton.gateway.limits import API_KEY_ENV, GatewayConfig, RepositoryLimits, api_key_setting

__all__ = ["API_KEY_ENV", "GatewayConfig", "RepositoryLimits", "api_key_setting", "create_app", "listen", "run_gateway"]
